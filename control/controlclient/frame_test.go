package controlclient

import (
	"bytes"
	"encoding/json"
	"net/netip"
	"reflect"
	"testing"

	"meshd.dev/meshd/netmap"
)

// TestMarshalResponse: the spliced encoding says what json.Marshal says
// (same fields and values once decoded), starts with the epoch and
// version, and round-trips through a frame.
func TestMarshalResponse(t *testing.T) {
	rules := []netmap.FilterRule{{
		SrcIPs:   []netip.Prefix{netip.MustParsePrefix("100.64.0.1/32"), netip.MustParsePrefix("fd7a:115c:a1e0::1/128")},
		DstPorts: []netmap.NetPortRange{{Net: netip.MustParsePrefix("100.64.0.2/32"), Ports: netmap.PortRange{First: 22, Last: 22}}},
		IPProto:  []uint8{netmap.ProtoTCP},
		Origin:   "p.hujson:3:5",
	}}
	empty := []netmap.FilterRule{}
	var null []netmap.FilterRule
	tests := []struct {
		name string
		r    netmap.MapResponse
	}{
		{"no filter", netmap.MapResponse{Epoch: "e", Version: 7, KeepAlive: true}},
		{"filter", netmap.MapResponse{Epoch: "e", Version: 8, PacketFilter: &rules, PeersRemoved: []netmap.NodeID{3}}},
		{"deny all", netmap.MapResponse{Epoch: "e", Version: 9, PacketFilter: &empty}},
		{"null filter", netmap.MapResponse{Epoch: "e", Version: 10, PacketFilter: &null}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			want, err := json.Marshal(&tt.r)
			if err != nil {
				t.Fatal(err)
			}
			got, err := MarshalResponse(&tt.r)
			if err != nil {
				t.Fatal(err)
			}
			var a, b map[string]any
			if err := json.Unmarshal(got, &a); err != nil {
				t.Fatalf("%s: %v", got, err)
			}
			if err := json.Unmarshal(want, &b); err != nil {
				t.Fatal(err)
			}
			if !reflect.DeepEqual(a, b) {
				t.Fatalf("encoded\n%s\nwant the fields of\n%s", got, want)
			}
			if !bytes.HasPrefix(got, []byte(`{"epoch":"e","version":`)) {
				t.Fatalf("%s: the epoch and version must lead (spliceVersion relies on it)", got)
			}
			frame, err := EncodeFrame(&tt.r)
			if err != nil {
				t.Fatal(err)
			}
			body, err := ReadFrame(bytes.NewReader(frame), nil)
			if err != nil {
				t.Fatal(err)
			}
			var back, wantBack netmap.MapResponse
			if err := json.Unmarshal(body, &back); err != nil {
				t.Fatal(err)
			}
			if err := json.Unmarshal(want, &wantBack); err != nil {
				t.Fatal(err)
			}
			if !reflect.DeepEqual(back, wantBack) {
				t.Fatalf("decoded %+v, want %+v", back, wantBack)
			}
		})
	}
}
