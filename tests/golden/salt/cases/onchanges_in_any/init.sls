one:
  test.succeed_without_changes:
    - onchanges_in:
      - test: reactor
two:
  test.succeed_with_changes:
    - onchanges_in:
      - test: reactor
reactor:
  test.succeed_without_changes: []
any_reactor:
  test.succeed_without_changes:
    - onchanges_any:
      - test: one
      - test: two
