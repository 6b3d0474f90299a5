shared:
  test.succeed_with_changes: []
other:
  test.nop:
    - watch:
      - test: shared
