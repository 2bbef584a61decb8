// Package throughput is the tunnel throughput lab of issue 7: two hosts in
// network namespaces with a router between them, iperf3 over the raw
// underlay, over stock wireguard-go and over meshd (kernel TUN with its
// packet filter, netstack, and relayed through the coordinator's DERP relay
// with direct UDP blocked), with the CPU time the tunnel processes use
// per gigabyte, and the idle memory and CPU of a daemon with many peers.
//
// The package is test code only. The smoke test (root, < 30 s) runs in CI;
// the full measurement needs the build tag "throughput" and is started by
// the script bench/throughput/run. See bench/throughput.md.
package throughput
