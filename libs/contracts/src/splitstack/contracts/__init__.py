"""splitstack contracts beyond the generated code: names, subjects, streams, envelopes, stacks, hand-off.

Everything here is data or a pure function of data; no service logic and no I/O besides reading
the package's own data files.
"""
