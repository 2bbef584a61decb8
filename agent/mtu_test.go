package agent

import "testing"

func TestAutoMTU(t *testing.T) {
	eth := func(name string, mtu int) underlayLink {
		return underlayLink{name: name, mtu: mtu, up: true, hasGlobal: true}
	}
	tests := []struct {
		name  string
		links []underlayLink
		want  int
		from  string
	}{
		{"ethernet", []underlayLink{{name: "lo", mtu: 65536, up: true, loopback: true, hasGlobal: true}, eth("eth0", 1500)}, 1420, "eth0"},
		{"jumbo fabric", []underlayLink{eth("ens1", 9000)}, 8920, "ens1"},
		{"smallest wins", []underlayLink{eth("ens1", 9000), eth("eth0", 1500)}, 1420, "eth0"},
		{"own tunnel ignored", []underlayLink{eth("meshd0", 1280), eth("ens1", 9000)}, 8920, "ens1"},
		{"down ignored", []underlayLink{{name: "eth1", mtu: 1400, hasGlobal: true}, eth("eth0", 1500)}, 1420, "eth0"},
		{"no address ignored", []underlayLink{{name: "eth1", mtu: 1400, up: true}, eth("eth0", 1500)}, 1420, "eth0"},
		{"tiny link floors at 1280", []underlayLink{eth("wwan0", 1300)}, 1280, "wwan0"},
		{"nothing known", []underlayLink{{name: "lo", mtu: 65536, up: true, loopback: true}}, 1280, ""},
		{"no links", nil, 1280, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, from := autoMTU(tt.links, "meshd0")
			if got != tt.want || from.name != tt.from {
				t.Fatalf("autoMTU = %d from %q, want %d from %q", got, from.name, tt.want, tt.from)
			}
		})
	}
}
