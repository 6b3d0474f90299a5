deploy:
  test.succeed_with_changes: []
prepare:
  test.fail_without_changes:
    - prereq:
      - test: deploy
