#!/bin/bash
# The fingerprint of the code a measurement ran: a hash over asrkf_edge/ and native/ sources (a device call copies
# the working tree when it starts, so the commit it ran can differ from the one its script was written for; the
# thirty-second session's second call ran a commit made while it waited for a machine). A commit's, to compare:
#   mkdir /tmp/c && git archive COMMIT asrkf_edge native | tar x -C /tmp/c && bash benchmarks/code_print.sh /tmp/c
cd "${1:-.}" && find asrkf_edge native -type f \( -name '*.py' -o -name '*.c' -o -name '*.h' \) | LC_ALL=C sort \
  | xargs sha256sum | sha256sum | cut -c1-16
