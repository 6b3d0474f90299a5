in_init:
  test.nop: []
