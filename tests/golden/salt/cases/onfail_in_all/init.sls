f1:
  test.fail_without_changes:
    - onfail_in:
      - test: any_fail
f2:
  test.fail_with_changes: []
ok1:
  test.succeed_without_changes: []
any_fail:
  test.succeed_without_changes:
    - onfail:
      - test: ok1
all_fail:
  test.succeed_with_changes:
    - onfail_all:
      - test: f1
      - test: f2
all_fail_mixed:
  test.succeed_with_changes:
    - onfail_all:
      - test: f1
      - test: ok1
