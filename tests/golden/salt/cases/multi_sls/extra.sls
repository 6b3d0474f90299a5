in_extra:
  test.nop:
    - require:
      - in_init
