d:
  test.succeed_without_changes:
    - require:
      - c
c:
  test.succeed_with_changes:
    - watch:
      - b
b:
  test.succeed_with_changes:
    - onchanges:
      - a
a:
  test.succeed_with_changes: []
e:
  test.fail_without_changes:
    - onfail:
      - d
