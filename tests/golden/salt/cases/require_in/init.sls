late:
  test.succeed_without_changes: []
early:
  test.succeed_with_changes:
    - require_in:
      - test: late
other:
  test.nop:
    - require_in:
      - late
