c:
  test.succeed_without_changes
a:
  test.succeed_with_changes: []
b:
  test:
    - nop
    - name: bee
