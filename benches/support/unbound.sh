# Shell functions shared by benches/load.sh and benches/rate_pair.sh (sourced, not run).

# The server: lines every unbound of the benchmarks shares (the upstream and the unbound
# contender): one thread in the foreground, no files outside $W, loopback only.
unbound_server() { # port
  cat <<CONF
server:
  interface: 127.0.0.1@$1
  port: $1
  num-threads: 1
  do-daemonize: no
  username: ""
  chroot: ""
  directory: "$W"
  pidfile: ""
  use-syslog: no
  logfile: ""
  verbosity: 0
  do-ip6: no
  access-control: 127.0.0.0/8 allow
CONF
}

# The upstream's forwarded names h0..h<n-1>.test: A, TTL 300; every fourth name has two
# addresses.
hit_names_data() { # n
  local i
  for ((i = 0; i < $1; i++)); do
    echo "  local-data: \"h$i.test. 300 IN A 192.0.2.$((i % 200 + 1))\""
    ((i % 4)) || echo "  local-data: \"h$i.test. 300 IN A 198.51.100.$((i % 200 + 1))\""
  done
}
