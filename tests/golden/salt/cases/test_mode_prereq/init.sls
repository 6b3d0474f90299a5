deploy:
  test.succeed_with_changes: []
stop_first:
  test.succeed_with_changes:
    - prereq:
      - test: deploy
quiet:
  test.succeed_without_changes: []
guard:
  test.succeed_without_changes:
    - prereq:
      - test: quiet
