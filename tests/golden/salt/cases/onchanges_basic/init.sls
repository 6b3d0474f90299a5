runs:
  test.succeed_with_changes:
    - onchanges:
      - test: changed
skipped:
  test.succeed_with_changes:
    - onchanges:
      - test: unchanged
changed:
  test.succeed_with_changes: []
unchanged:
  test.succeed_without_changes: []
