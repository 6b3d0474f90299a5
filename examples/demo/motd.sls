# Every node describes itself from its own facts and labels.
motd:
  file.managed:
    - name: {{ vars.out }}/{{ node.name }}/motd
    - makedirs: True
    - contents: |
        {{ node.name }}: {{ node.facts.os }} {{ node.facts.osrelease }}, {{ node.facts.cpus }} cpus
        role: {{ node.labels.role | default('none') }}
