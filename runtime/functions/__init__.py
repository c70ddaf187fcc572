"""Functions: finding what a node serves, without running user code in the node.

- `loader`: imports a function file by path and collects the specs it declares (only in
  subprocesses);
- `discover`: the isolated subprocess that does so for one file
  (`python -m runtime.functions.discover`);
- `catalog`: the node's functions and how each is isolated (uids, folders), decided at
  start-up;
- `readable`: the model folders a function declares, made readable to its sandboxes and
  loaders wherever they are (bound into their namespaces, or staged as copies).
"""
