{% for i in range(3) %}
step_{{ i }}:
  test.succeed_without_changes:
    - name: item {{ i }}
{% endfor %}
final:
  test.nop:
    - require:
      - test: step_0
