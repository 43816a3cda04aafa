"""ebpf-tproxy as a chained CNI plugin (type "ebpf-tproxy"), the way Kuma CNI installs the
redirect during the CNI ADD of a pod:

  proto.py      the CNI protocol: environment, stdin, versions, results, errors (stdlib only)
  podconfig.py  a pod's annotations (or Kuma's transparent-proxy-config YAML) over the node's
                KUMA_RUNTIME_KUBERNETES_* defaults over Kuma's defaults -> Settings
  apiserver.py  the pod's annotations from the API server, when the runtime gave none
  plugin.py     the verbs: ADD registers the pod's network namespace in the node program set
                (map writes, never a compile), DEL removes it, CHECK, STATUS, GC
  shim.py       the executable a node's runtime runs (stdlib only): hands the request to
                the agent over a unix socket, which answers it warm
  server.py     that socket, inside the agent
  install.py    `ebpf-tproxy cni install`: the plugin into the CNI bin dir and the conflist
"""
