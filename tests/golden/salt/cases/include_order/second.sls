include:
  - .first
second_state:
  test.nop: []
