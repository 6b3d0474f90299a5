top:
  test.succeed_without_changes:
    - require:
      - left
      - right
left:
  test.succeed_with_changes:
    - require:
      - root
right:
  test.succeed_with_changes:
    - require:
      - root
root:
  test.succeed_without_changes: []
