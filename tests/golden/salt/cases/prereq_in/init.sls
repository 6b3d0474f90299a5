target:
  test.succeed_with_changes: []
pre_a:
  test.succeed_without_changes:
    - prereq_in:
      - test: target
unrelated:
  test.nop: []
