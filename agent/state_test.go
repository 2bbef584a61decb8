package agent

import (
	"errors"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"meshd.dev/meshd/netmap"
)

func testNode(id netmap.NodeID, v4 string) netmap.Node {
	a := netip.MustParsePrefix(v4 + "/32")
	return netmap.Node{ID: id, Hostname: "n" + v4, NodeKey: netmap.NewNodePrivate().Public(), Addresses: []netip.Prefix{a}, AllowedIPs: []netip.Prefix{a}}
}

func TestStoreIdentityPersists(t *testing.T) {
	dir := t.TempDir()
	s, err := OpenStore(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	id1, err := s.LoadOrCreateIdentity()
	if err != nil {
		t.Fatal(err)
	}
	id2, err := s.LoadOrCreateIdentity()
	if err != nil {
		t.Fatal(err)
	}
	if !id1.MachineKey.Equal(id2.MachineKey) || id1.NodeKey != id2.NodeKey {
		t.Fatal("identity changed between loads")
	}
	fi, err := os.Stat(filepath.Join(dir, identityFile))
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm() != 0o600 {
		t.Errorf("identity mode = %v, want 0600", fi.Mode().Perm())
	}
	if di, _ := os.Stat(dir); di.Mode().Perm() != 0o700 {
		t.Errorf("state dir mode = %v, want 0700", di.Mode().Perm())
	}
}

func TestStoreCorruptFilesMovedAside(t *testing.T) {
	for _, tc := range []struct {
		file, content string
		load          func(*Store) error
	}{
		{identityFile, "{not json", func(s *Store) error { _, err := s.LoadOrCreateIdentity(); return err }},
		{identityFile, `{"machine_key":"AAAA","node_key":"privkey:` + strings.Repeat("00", 32) + `"}`, func(s *Store) error { _, err := s.LoadOrCreateIdentity(); return err }},
		{loginFile, `{"coordinator_url":"https://x","node_id":0}`, func(s *Store) error { _, err := s.LoadLogin(); return err }},
		{loginFile, ``, func(s *Store) error { _, err := s.LoadLogin(); return err }},
		{netmapFile, `{"epoch":"e","version":1,"full":true}`, func(s *Store) error { _, err := s.LoadNetworkMap(); return err }},
		{netmapFile, `{"epoch":"e","version":1}`, func(s *Store) error { _, err := s.LoadNetworkMap(); return err }},
	} {
		t.Run(tc.file+"/"+tc.content, func(t *testing.T) {
			dir := t.TempDir()
			s, err := OpenStore(dir)
			if err != nil {
				t.Fatal(err)
			}
			defer s.Close()
			path := filepath.Join(dir, tc.file)
			if err := os.WriteFile(path, []byte(tc.content), 0o600); err != nil {
				t.Fatal(err)
			}
			err = tc.load(s)
			var ce *CorruptFileError
			if !errors.As(err, &ce) {
				t.Fatalf("load: got %v, want a CorruptFileError", err)
			}
			if strings.Contains(ce.Error(), "\n") {
				t.Errorf("error is not one line: %q", ce.Error())
			}
			got, err := os.ReadFile(ce.MovedTo)
			if err != nil || string(got) != tc.content {
				t.Fatalf("moved-aside file = %q, %v; want the original content", got, err)
			}
			if _, err := os.Stat(path); !os.IsNotExist(err) {
				t.Errorf("corrupt file still in place: %v", err)
			}
		})
	}
}

func TestStoreNetworkMapRoundTrip(t *testing.T) {
	s, err := OpenStore(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if nm, err := s.LoadNetworkMap(); err != nil || nm != nil {
		t.Fatalf("empty store: got %v, %v", nm, err)
	}
	self := testNode(1, "100.64.0.1")
	p := testNode(2, "100.64.0.2")
	p.Endpoints = []netip.AddrPort{netip.MustParseAddrPort("198.18.0.2:41641")}
	nm := &netmap.NetworkMap{}
	if err := nm.Apply(&netmap.MapResponse{Epoch: "e1", Version: 7, Full: true, Self: &self, Peers: []netmap.Node{p}, PacketFilter: &[]netmap.FilterRule{}}); err != nil {
		t.Fatal(err)
	}
	if err := s.SaveNetworkMap(nm); err != nil {
		t.Fatal(err)
	}
	got, err := s.LoadNetworkMap()
	if err != nil {
		t.Fatal(err)
	}
	if got.Epoch != "e1" || got.Version != 7 || got.Self.ID != 1 || len(got.Peers) != 1 || got.Peers[2].Endpoints[0] != p.Endpoints[0] {
		t.Fatalf("round trip mismatch: %+v", got)
	}
	if got.PacketFilter == nil {
		t.Error("empty (deny-all) packet filter became nil (allow-all default) on reload")
	}
}

func TestOpenStoreNotWritable(t *testing.T) {
	if os.Getuid() == 0 {
		t.Skip("root can write anywhere; permission check not testable as root")
	}
	dir := t.TempDir()
	os.Chmod(dir, 0o500)
	defer os.Chmod(dir, 0o700)
	if _, err := OpenStore(dir); err == nil || !strings.Contains(err.Error(), "not writable") {
		t.Fatalf("OpenStore on read-only dir: %v", err)
	}
}

func TestOpenStoreIsAFile(t *testing.T) {
	f := filepath.Join(t.TempDir(), "file")
	os.WriteFile(f, nil, 0o600)
	if _, err := OpenStore(f); err == nil {
		t.Fatal("OpenStore on a regular file succeeded")
	}
}

func FuzzLoadState(f *testing.F) {
	f.Add([]byte(`{"coordinator_url":"https://127.0.0.1:8443","server_pin":"abc","node_id":3,"want_running":true}`))
	f.Add([]byte(`{"epoch":"e","version":1,"full":true,"self":{"id":1,"node_key":"nodekey:` + strings.Repeat("11", 32) + `","addresses":["100.64.0.1/32"]}}`))
	f.Add([]byte(`{"machine_key":"` + strings.Repeat("A", 86) + `==","node_key":"privkey:` + strings.Repeat("01", 32) + `"}`))
	f.Fuzz(func(t *testing.T, data []byte) {
		dir := t.TempDir()
		s, err := OpenStore(dir)
		if err != nil {
			t.Fatal(err)
		}
		defer s.Close()
		for _, name := range []string{identityFile, loginFile, netmapFile} {
			os.WriteFile(filepath.Join(dir, name), data, 0o600)
		}
		_, errID := s.LoadOrCreateIdentity()
		_, errLogin := s.LoadLogin()
		_, errMap := s.LoadNetworkMap()
		for _, err := range []error{errID, errLogin, errMap} {
			var ce *CorruptFileError
			if err != nil && !errors.As(err, &ce) {
				t.Fatalf("error is not a CorruptFileError: %v", err)
			}
			if ce != nil {
				if got, _ := os.ReadFile(ce.MovedTo); string(got) != string(data) {
					t.Fatal("corrupt file content lost")
				}
			}
		}
	})
}

func TestStoreLock(t *testing.T) {
	dir := t.TempDir()
	s, err := OpenStore(dir)
	if err != nil {
		t.Fatal(err)
	}
	if s2, err := OpenStore(dir); err == nil || !strings.Contains(err.Error(), "in use by another meshd") {
		if s2 != nil {
			s2.Close()
		}
		t.Fatalf("second OpenStore of a locked dir: %v", err)
	}
	s.Close()
	s3, err := OpenStore(dir)
	if err != nil {
		t.Fatalf("OpenStore after Close: %v", err)
	}
	s3.Close()
}
