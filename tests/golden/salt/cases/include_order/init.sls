include:
  - include_order.second
  - include_order.first
own:
  test.nop: []
