# One node makes a secret; every node receives it through the datastore. The consumers wait
# for it: `${{ nodes.NODE.steps.ID.FIELD }}` watches NODE's result for step ID.
{% if node.name == 'n3' %}
make-token:
  cmd.run:
    - name: cat /proc/sys/kernel/random/uuid
{% endif %}

install-token:
  file.managed:
    - name: {{ vars.out }}/{{ node.name }}/token
    - makedirs: True
    - mode: "0600"
    - contents: "${{ nodes.n3.steps.make-token.stdout }}"

# Runs on one node of the run only, like Ansible's run_once.
announce:
  cmd.run:
    - name: echo "token handed to every node"
    - target_limit: 1
