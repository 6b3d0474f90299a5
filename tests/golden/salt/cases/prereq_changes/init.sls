stop_service:
  test.succeed_with_changes:
    - prereq:
      - test: deploy
deploy:
  test.succeed_with_changes: []
