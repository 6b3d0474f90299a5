changer:
  test.succeed_with_changes: []
on_change:
  test.succeed_with_changes:
    - onchanges:
      - test: changer
failer:
  test.fail_without_changes: []
after_fail:
  test.nop:
    - require:
      - test: failer
watcher:
  test.succeed_without_changes:
    - watch:
      - test: changer
rescue:
  test.succeed_with_changes:
    - onfail:
      - test: failer
