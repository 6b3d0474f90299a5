deploy:
  test.succeed_without_changes: []
stop_service:
  test.succeed_with_changes:
    - prereq:
      - test: deploy
after:
  test.nop:
    - require:
      - stop_service
