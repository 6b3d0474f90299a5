first_state:
  test.nop: []
