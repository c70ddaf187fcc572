"""The node's child processes and what they are kept to.

- `frames`: the length-prefixed msgpack frames the node and its children speak;
- `children`: starting children that die with the node, even on SIGKILL, their
  environment, and process trees;
- `isolation`: what keeps a function's code away from everything not its own (PID, mount
  and network namespaces, an unprivileged uid) and the probe that finds what this host
  allows (`python -m runtime.proc.isolation`);
- `locks`: file locks the kernel releases when their holder dies;
- `usage`: what a process holds (private pages, device memory) and the machine's memory.
"""
