package agent

import (
	"context"
	"slices"
	"strings"
	"testing"
	"time"

	"meshd.dev/meshd/agent/localapi"
	"meshd.dev/meshd/control"
)

// TestPlanUp checks what `meshd up` does with each setting, before it
// changes anything: on a registered node a setting changes something the
// node can change or matches what it is, and one that would change nothing
// is an error saying why and what to do.
func TestPlanUp(t *testing.T) {
	login := &Login{CoordinatorURL: "https://c:8443", ServerPin: "pin", NodeID: 7, Hostname: "gpu-3-1", RequestedHostname: "gpu-3", WantRunning: true}
	oldLogin := &Login{CoordinatorURL: "https://c:8443", ServerPin: "pin", NodeID: 7, Hostname: "gpu-3"} // before requested names were kept
	tagged := enrolment{login: login, tags: []string{"tag:a"}}
	user := enrolment{login: login}
	gone := enrolment{login: login, tags: []string{"tag:a"}, needsReauth: true}
	noDNSLogin := *login
	noDNSLogin.NoAcceptDNS = true
	noDNS := enrolment{login: &noDNSLogin, tags: []string{"tag:a"}}
	tags := func(t ...string) []string { return t }
	on, off := new(true), new(false)
	for _, tt := range []struct {
		name    string
		cur     enrolment
		req     localapi.UpRequest
		want    upAction
		wantReg registration // upRegister
		wantTag []string     // upRetag
		wantDNS *bool        // a new --accept-dns setting
		note    string       // substring of the plan's note
		err     string       // substring of the error
	}{
		{name: "first registration", cur: enrolment{}, req: localapi.UpRequest{AuthKey: "k", Coordinator: "https://c:8443", Hostname: "h", Tags: tags("TAG:B", "tag:a")},
			want: upRegister, wantReg: registration{coordinator: "https://c:8443", hostname: "h", authKey: "k", tags: tags("tag:a", "tag:b")}},
		{name: "first registration without key", cur: enrolment{}, req: localapi.UpRequest{Coordinator: "https://c:8443"}, err: "--authkey KEY --coordinator URL"},
		{name: "first registration without coordinator", cur: enrolment{}, req: localapi.UpRequest{AuthKey: "k"}, err: "--coordinator URL"},
		{name: "bad tag", cur: tagged, req: localapi.UpRequest{Tags: tags("not a tag")}, err: "--advertise-tags"},
		{name: "plain up", cur: tagged, req: localapi.UpRequest{}, want: upStart},
		{name: "same coordinator", cur: tagged, req: localapi.UpRequest{Coordinator: "https://c:8443"}, want: upStart},
		{name: "other coordinator", cur: tagged, req: localapi.UpRequest{Coordinator: "https://other:8443"}, err: "fresh --state-dir"},
		{name: "explicit key on a registered node", cur: tagged, req: localapi.UpRequest{AuthKey: "k"}, err: "meshd up --force-reauth --authkey KEY"},
		{name: "key from the environment", cur: tagged, req: localapi.UpRequest{AuthKey: "k", AuthKeyFromEnv: true}, want: upStart, note: "MESHD_AUTHKEY not used"},
		{name: "key after deletion or expiry", cur: gone, req: localapi.UpRequest{AuthKey: "k"},
			want: upRegister, wantReg: registration{coordinator: "https://c:8443", pin: "pin", hostname: "gpu-3", authKey: "k"}},
		{name: "force-reauth", cur: tagged, req: localapi.UpRequest{AuthKey: "k", ForceReauth: true, Hostname: "new"},
			want: upRegister, wantReg: registration{coordinator: "https://c:8443", pin: "pin", hostname: "new", authKey: "k"}},
		{name: "force-reauth back to the user", cur: tagged, req: localapi.UpRequest{AuthKey: "userkey", ForceReauth: true, SetTags: true},
			want: upRegister, wantReg: registration{coordinator: "https://c:8443", pin: "pin", hostname: "gpu-3", authKey: "userkey", tags: tags()}},
		{name: "force-reauth keeps an old registered name", cur: enrolment{login: oldLogin}, req: localapi.UpRequest{AuthKey: "k", ForceReauth: true},
			want: upRegister, wantReg: registration{coordinator: "https://c:8443", pin: "pin", hostname: "gpu-3", authKey: "k"}},
		{name: "force-reauth without key", cur: tagged, req: localapi.UpRequest{ForceReauth: true}, err: "pass --authkey KEY"},
		{name: "requested hostname", cur: tagged, req: localapi.UpRequest{Hostname: "GPU-3"}, want: upStart},
		{name: "registered hostname", cur: tagged, req: localapi.UpRequest{Hostname: "gpu-3-1"}, want: upStart},
		{name: "another hostname", cur: tagged, req: localapi.UpRequest{Hostname: "gpu-4"}, err: "--force-reauth --authkey KEY --hostname gpu-4"},
		{name: "another hostname from an old login", cur: enrolment{login: oldLogin}, req: localapi.UpRequest{Hostname: "gpu-4"}, err: "does not rename"},
		{name: "retag", cur: tagged, req: localapi.UpRequest{Tags: tags("tag:b"), SetTags: true}, want: upRetag, wantTag: tags("tag:b")},
		{name: "retag without SetTags (older CLI)", cur: tagged, req: localapi.UpRequest{Tags: tags("tag:b")}, want: upRetag, wantTag: tags("tag:b")},
		{name: "retag from the environment", cur: tagged, req: localapi.UpRequest{Tags: tags("tag:b"), SetTags: true, TagsFromEnv: true}, want: upRetag, wantTag: tags("tag:b")},
		{name: "user tags its node", cur: user, req: localapi.UpRequest{Tags: tags("tag:ci"), SetTags: true}, want: upRetag, wantTag: tags("tag:ci")},
		{name: "same tags", cur: tagged, req: localapi.UpRequest{Tags: tags("TAG:A"), SetTags: true}, err: "already has the tags tag:a"},
		{name: "same tags from the environment", cur: tagged, req: localapi.UpRequest{Tags: tags("tag:a"), SetTags: true, TagsFromEnv: true}, want: upStart},
		{name: "no tags on an untagged node", cur: user, req: localapi.UpRequest{SetTags: true}, err: "has no tags"},
		{name: "untag by itself", cur: tagged, req: localapi.UpRequest{SetTags: true}, err: "meshd up --force-reauth --authkey USERKEY --advertise-tags="},
		{name: "explicit key and tags", cur: tagged, req: localapi.UpRequest{AuthKey: "k", Tags: tags("tag:b"), SetTags: true}, err: "--force-reauth"},
		{name: "env key and retag", cur: tagged, req: localapi.UpRequest{AuthKey: "k", AuthKeyFromEnv: true, Tags: tags("tag:b"), SetTags: true},
			want: upRetag, wantTag: tags("tag:b"), note: "MESHD_AUTHKEY not used"},
		{name: "first registration without DNS", cur: enrolment{}, req: localapi.UpRequest{AuthKey: "k", Coordinator: "https://c:8443", AcceptDNS: off},
			want: upRegister, wantReg: registration{coordinator: "https://c:8443", authKey: "k", noAcceptDNS: true}},
		{name: "first registration with DNS said", cur: enrolment{}, req: localapi.UpRequest{AuthKey: "k", Coordinator: "https://c:8443", AcceptDNS: on},
			want: upRegister, wantReg: registration{coordinator: "https://c:8443", authKey: "k"}},
		{name: "accept-dns=false", cur: tagged, req: localapi.UpRequest{AcceptDNS: off}, want: upStart, wantDNS: off},
		{name: "accept-dns again", cur: noDNS, req: localapi.UpRequest{AcceptDNS: on}, want: upStart, wantDNS: on},
		{name: "accept-dns on a node that does", cur: tagged, req: localapi.UpRequest{AcceptDNS: on}, err: "--accept-dns changes nothing"},
		{name: "accept-dns=false on a node that does not", cur: noDNS, req: localapi.UpRequest{AcceptDNS: off}, err: "--accept-dns=false changes nothing"},
		{name: "accept-dns from the environment, as it is", cur: noDNS, req: localapi.UpRequest{AcceptDNS: off, AcceptDNSFromEnv: true}, want: upStart},
		{name: "accept-dns from the environment, a change", cur: tagged, req: localapi.UpRequest{AcceptDNS: off, AcceptDNSFromEnv: true}, want: upStart, wantDNS: off},
		{name: "retag and accept-dns=false", cur: tagged, req: localapi.UpRequest{Tags: tags("tag:b"), SetTags: true, AcceptDNS: off},
			want: upRetag, wantTag: tags("tag:b"), wantDNS: off},
		{name: "same tags and accept-dns=false", cur: tagged, req: localapi.UpRequest{Tags: tags("tag:a"), SetTags: true, AcceptDNS: off}, err: "already has the tags"},
		{name: "force-reauth keeps accept-dns=false", cur: noDNS, req: localapi.UpRequest{AuthKey: "k", ForceReauth: true},
			want: upRegister, wantReg: registration{coordinator: "https://c:8443", pin: "pin", hostname: "gpu-3", authKey: "k", noAcceptDNS: true}},
		{name: "force-reauth with accept-dns", cur: noDNS, req: localapi.UpRequest{AuthKey: "k", ForceReauth: true, AcceptDNS: on},
			want: upRegister, wantReg: registration{coordinator: "https://c:8443", pin: "pin", hostname: "gpu-3", authKey: "k"}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			p, err := planUp(tt.cur, tt.req)
			if tt.err != "" {
				if err == nil || !strings.Contains(err.Error(), tt.err) {
					t.Fatalf("planUp = %+v, %v; want an error containing %q", p, err, tt.err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if p.action != tt.want {
				t.Fatalf("action %d, want %d (plan %+v)", p.action, tt.want, p)
			}
			r, w := p.reg, tt.wantReg
			if r.coordinator != w.coordinator || r.pin != w.pin || r.hostname != w.hostname || r.authKey != w.authKey || !slices.Equal(r.tags, w.tags) ||
				r.noAcceptDNS != w.noAcceptDNS {
				t.Errorf("registration %+v, want %+v", r, w)
			}
			if !slices.Equal(p.tags, tt.wantTag) {
				t.Errorf("retag to %v, want %v", p.tags, tt.wantTag)
			}
			if (p.acceptDNS == nil) != (tt.wantDNS == nil) || p.acceptDNS != nil && *p.acceptDNS != *tt.wantDNS {
				t.Errorf("accept-dns change %v, want %v", p.acceptDNS, tt.wantDNS)
			}
			if !strings.Contains(p.note, tt.note) || (tt.note == "") != (p.note == "") {
				t.Errorf("note %q, want %q", p.note, tt.note)
			}
		})
	}
}

// lifecyclePolicy: the test key's tag owns tag:b; tag:prod is the admin's.
const lifecyclePolicy = `{
	"tagOwners": {"tag:test": [], "tag:b": ["tag:test"], "tag:prod": []},
	"grants": [{"src": ["tag:test", "tag:b", "autogroup:member"], "dst": ["tag:test", "tag:b", "autogroup:member"], "ip": ["*"]}],
}`

// TestUpLifecycle runs `meshd up` on an enrolled node against a real
// coordinator: re-tagging (allowed and refused), no-op settings refused
// with the state unchanged, the environment's auth key ignored with a
// note, and --force-reauth with a user's key returning the node to the
// user without a new address or a data-plane restart.
func TestUpLifecycle(t *testing.T) {
	m := newTestMesh(t)
	ctx := context.Background()
	if _, err := m.srv.ApplyPolicy(ctx, "lifecycle.hujson", []byte(lifecyclePolicy)); err != nil {
		t.Fatal(err)
	}
	userKey, _, err := m.srv.CreateAuthKey(ctx, control.AuthKeyOptions{User: "alice@example.com", Preauthorized: true})
	if err != nil {
		t.Fatal(err)
	}
	a := m.join("a")
	p := m.join("p")
	first, _ := a.Status(ctx)
	a.mu.Lock()
	eng := a.eng
	a.mu.Unlock()

	// Each step runs on the state the previous ones left.
	for _, step := range []struct {
		name     string
		req      localapi.UpRequest
		err      []string // substrings; nil: must succeed
		tags     []string // the node's tags afterwards
		user     string   // the node's user afterwards
		msg      string   // substring of the returned status message
		peerSees bool     // wait for p to see a with these tags and user
	}{
		{name: "explicit auth key", req: localapi.UpRequest{AuthKey: m.key}, err: []string{"already registered", "meshd up --force-reauth --authkey KEY"}, tags: []string{"tag:test"}},
		{name: "auth key from the environment", req: localapi.UpRequest{AuthKey: m.key, AuthKeyFromEnv: true}, tags: []string{"tag:test"}, msg: "MESHD_AUTHKEY not used"},
		{name: "same tags", req: localapi.UpRequest{Tags: []string{"tag:test"}, SetTags: true}, err: []string{"already has the tags tag:test"}, tags: []string{"tag:test"}},
		{name: "same tags from the environment", req: localapi.UpRequest{Tags: []string{"tag:test"}, SetTags: true, TagsFromEnv: true}, tags: []string{"tag:test"}},
		{name: "another hostname", req: localapi.UpRequest{Hostname: "renamed"}, err: []string{"does not rename", "--force-reauth"}, tags: []string{"tag:test"}},
		{name: "the same hostname", req: localapi.UpRequest{Hostname: "A"}, tags: []string{"tag:test"}},
		{name: "force-reauth without a key", req: localapi.UpRequest{ForceReauth: true}, err: []string{"pass --authkey KEY"}, tags: []string{"tag:test"}},
		{name: "a tag the node does not own", req: localapi.UpRequest{Tags: []string{"tag:prod"}, SetTags: true},
			err: []string{`tag "tag:prod"`, `"tagOwners" at lifecycle.hujson:2`, "meshd admin nodes tag"}, tags: []string{"tag:test"}},
		{name: "untag by itself", req: localapi.UpRequest{SetTags: true}, err: []string{"--force-reauth --authkey USERKEY --advertise-tags="}, tags: []string{"tag:test"}},
		{name: "retag to an owned tag", req: localapi.UpRequest{Tags: []string{"tag:b"}, SetTags: true}, tags: []string{"tag:b"}, peerSees: true},
		{name: "bad key with force-reauth", req: localapi.UpRequest{AuthKey: "mskey-garbage", ForceReauth: true}, err: []string{"auth key"}, tags: []string{"tag:b"}},
		{name: "accept-dns=false in netstack mode", req: localapi.UpRequest{AcceptDNS: new(false)}, tags: []string{"tag:b"}, msg: "--accept-dns is kept for kernel TUN mode"},
		{name: "accept-dns=false again", req: localapi.UpRequest{AcceptDNS: new(false)}, err: []string{"--accept-dns=false changes nothing"}, tags: []string{"tag:b"}},
		{name: "back to the user", req: localapi.UpRequest{AuthKey: userKey, ForceReauth: true, SetTags: true}, user: "alice@example.com", peerSees: true},
	} {
		t.Run(step.name, func(t *testing.T) {
			st, err := a.Up(ctx, step.req)
			if step.err != nil {
				if err == nil {
					t.Fatalf("Up succeeded (%+v); want an error", st.Self)
				}
				for _, w := range step.err {
					if !strings.Contains(err.Error(), w) {
						t.Errorf("error %q lacks %q", err, w)
					}
				}
				st, _ = a.Status(ctx)
			} else if err != nil {
				t.Fatal(err)
			}
			if st.BackendState != localapi.StateRunning || !slices.Equal(st.Self.Tags, nonNil(step.tags)) || st.Self.User != step.user ||
				st.Self.ID != first.Self.ID || !slices.Equal(st.Self.IPs, first.Self.IPs) {
				t.Fatalf("after the step: %s %+v; want running with tags %v user %q, id %d, addresses %v",
					st.BackendState, st.Self, step.tags, step.user, first.Self.ID, first.Self.IPs)
			}
			if !strings.Contains(st.Message, step.msg) {
				t.Errorf("status message %q lacks %q", st.Message, step.msg)
			}
			if step.peerSees {
				waitStatus(t, p, "p to see a's new identity", func(st *localapi.Status) bool {
					pa := peerNamed(st, "a")
					return pa != nil && slices.Equal(pa.Tags, nonNil(step.tags)) && pa.User == step.user
				})
			}
		})
	}
	a.mu.Lock()
	same := a.eng == eng
	a.mu.Unlock()
	if !same {
		t.Error("re-tagging or registering again restarted the data plane")
	}
	// The saved registration follows, so a restarted daemon knows it.
	saved, err := a.store.LoadLogin()
	if err != nil || saved.RequestedHostname != "a" || len(saved.Tags) != 0 || saved.NodeID != first.Self.ID || !saved.NoAcceptDNS {
		t.Errorf("login.json after the steps: %+v, %v", saved, err)
	}
	echoThrough(t, p, a, "a", 7100, "still reachable")
}

// TestUpWaitsForApproval: on a coordinator that requires approval, Up
// returns at once with NeedsApproval and a message saying so, status shows
// it, and the node comes up by itself when an admin approves it.
func TestUpWaitsForApproval(t *testing.T) {
	m := newTestMeshWith(t, control.ServerOptions{RequireApproval: true})
	ctx := context.Background()
	key, _, err := m.srv.CreateAuthKey(ctx, control.AuthKeyOptions{Tags: []string{"tag:test"}})
	if err != nil {
		t.Fatal(err)
	}
	a := m.start("pending", func(o *Options) { o.ApprovalPoll = 50 * time.Millisecond })
	begin := time.Now()
	st, err := a.Up(ctx, localapi.UpRequest{AuthKey: key, Coordinator: m.url, Hostname: "pending"})
	if err != nil {
		t.Fatal(err)
	}
	if st.BackendState != localapi.StateNeedsApproval || !strings.Contains(st.Message, "waiting for approval by an admin") || st.Self == nil {
		t.Fatalf("up: %s %q %+v; want NeedsApproval saying so", st.BackendState, st.Message, st.Self)
	}
	if d := time.Since(begin); d > 10*time.Second {
		t.Errorf("up took %v: it waited for a map that cannot come", d)
	}
	if st, _ := a.Status(ctx); st.BackendState != localapi.StateNeedsApproval || strings.Contains(st.Message, "unreachable") {
		t.Fatalf("status: %s %q", st.BackendState, st.Message)
	}
	// Up again while pending says the same, no error.
	if st, err := a.Up(ctx, localapi.UpRequest{}); err != nil || st.BackendState != localapi.StateNeedsApproval {
		t.Fatalf("up while pending: %v %+v", err, st)
	}
	got := make(chan *localapi.Status, 1)
	go func() {
		wctx, cancel := context.WithTimeout(ctx, 30*time.Second)
		defer cancel()
		st, _ := a.WaitState(wctx, localapi.StateNeedsApproval)
		got <- st
	}()
	if err := m.srv.ApproveNode(ctx, st.Self.ID); err != nil {
		t.Fatal(err)
	}
	st = <-got
	if st.BackendState != localapi.StateRunning || len(st.Self.IPs) == 0 {
		t.Fatalf("after approval: %s %+v; want running with addresses", st.BackendState, st.Self)
	}
}

// TestStatusVerdicts: a node the coordinator expired shows "Expired" (not
// "coordinator unreachable"), an auth key then enrols it again with its
// addresses, and a deleted node shows that it was deleted.
func TestStatusVerdicts(t *testing.T) {
	m := newTestMesh(t)
	ctx := context.Background()
	a := m.join("a")
	before, _ := a.Status(ctx)
	if err := m.srv.ExpireNode(ctx, before.Self.ID); err != nil {
		t.Fatal(err)
	}
	st := waitStatus(t, a, "expired", func(st *localapi.Status) bool { return st.BackendState == localapi.StateExpired })
	if !strings.Contains(st.Message, "expired") || !strings.Contains(st.Message, "meshd up --authkey KEY") || strings.Contains(st.Message, "unreachable") || st.Self.Online {
		t.Fatalf("expired status: %q online=%v", st.Message, st.Self.Online)
	}
	st, err := a.Up(ctx, localapi.UpRequest{AuthKey: m.key})
	if err != nil {
		t.Fatalf("re-enrol after expiry: %v", err)
	}
	if st.BackendState != localapi.StateRunning || st.Self.ID != before.Self.ID || !slices.Equal(st.Self.IPs, before.Self.IPs) {
		t.Fatalf("after re-enrolling: %s %+v; want running as before", st.BackendState, st.Self)
	}

	if err := m.srv.DeleteNode(ctx, before.Self.ID); err != nil {
		t.Fatal(err)
	}
	st = waitStatus(t, a, "deleted", func(st *localapi.Status) bool { return st.BackendState == localapi.StateNeedsLogin })
	if !strings.Contains(st.Message, "deleted") || st.Self == nil {
		t.Fatalf("deleted status: %q %+v", st.Message, st.Self)
	}
}
