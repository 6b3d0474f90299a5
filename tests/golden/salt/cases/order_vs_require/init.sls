a:
  test.nop:
    - order: 1
    - require:
      - test: b
b:
  test.nop:
    - order: 10
c:
  test.nop:
    - order: 5
