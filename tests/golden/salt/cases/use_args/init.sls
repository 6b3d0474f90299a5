base_state:
  test.succeed_without_changes:
    - comment: shared comment
user:
  test.succeed_without_changes:
    - use:
      - test: base_state
giver:
  test.fail_without_changes:
    - comment: given away
    - use_in:
      - test: receiver
receiver:
  test.fail_without_changes: []
