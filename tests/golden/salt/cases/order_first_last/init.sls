middle:
  test.nop: []
at_end:
  test.nop:
    - order: last
at_start:
  test.nop:
    - order: first
middle_two:
  test.nop: []
