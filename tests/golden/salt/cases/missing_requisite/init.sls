a:
  test.nop:
    - require:
      - test: does_not_exist
