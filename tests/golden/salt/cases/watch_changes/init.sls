watcher:
  test.succeed_without_changes:
    - watch:
      - test: changer
changer:
  test.succeed_with_changes: []
quiet_watcher:
  test.succeed_without_changes:
    - watch:
      - test: quiet
quiet:
  test.succeed_without_changes: []
