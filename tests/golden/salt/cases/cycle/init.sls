a:
  test.nop:
    - require:
      - b
b:
  test.nop:
    - require:
      - c
c:
  test.nop:
    - require:
      - a
free:
  test.nop: []
