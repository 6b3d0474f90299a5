w:
  test.succeed_without_changes:
    - watch_any:
      - test: fails
      - test: changes
fails:
  test.fail_without_changes: []
changes:
  test.succeed_with_changes: []
