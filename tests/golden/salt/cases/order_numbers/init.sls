z:
  test.nop:
    - order: 3
y:
  test.nop:
    - order: 1
x:
  test.nop:
    - order: 2
w:
  test.nop: []
neg:
  test.nop:
    - order: -1
