pkgs:
  test.succeed_without_changes:
    - names:
      - one
      - two
      - three
after_names:
  test.nop:
    - require:
      - test: two
