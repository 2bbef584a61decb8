package agent

import (
	"context"
	"errors"
	"fmt"

	"meshd.dev/meshd/agent/localapi"
	"meshd.dev/meshd/agent/serve"
	"meshd.dev/meshd/netmap"
)

// serveFile holds the serve configuration (`meshd serve`), so it survives
// restarts.
const serveFile = "serve.json"

// LoadServeConfig returns the saved serve configuration; an empty one when
// there is none. A file that does not decode or validate is moved aside
// and reported as a *CorruptFileError.
func (s *Store) LoadServeConfig() (serve.Config, error) {
	var c serve.Config
	_, err := s.readJSON(serveFile, &c, func() error { return c.Validate() })
	if err != nil {
		return serve.Config{}, err
	}
	return c, nil
}

// SaveServeConfig stores c (0600, atomically).
func (s *Store) SaveServeConfig(c serve.Config) error {
	if c.Entries == nil {
		c.Entries = []serve.Entry{}
	}
	return s.writeJSON(serveFile, &c)
}

// initServe loads the serve configuration and makes the server that runs
// it. A corrupt file is moved aside and the node serves nothing (failing
// closed: exposing less than asked, never more), which `meshd serve
// status` and the log say.
func (a *Agent) initServe() error {
	cfg, err := a.store.LoadServeConfig()
	var ce *CorruptFileError
	switch {
	case errors.As(err, &ce):
		a.serveNote = fmt.Sprintf("the saved serve configuration was unusable (%v) and was moved to %s: nothing is served until you serve again", ce.Err, ce.MovedTo)
		a.log.Error("serve: "+a.serveNote, "path", ce.Path)
	case err != nil:
		return err
	}
	reserved := map[uint16]string{}
	for _, f := range a.opts.Forwards {
		reserved[f.Port] = "--forward " + f.String()
	}
	for _, svc := range a.opts.HTTPSServices {
		reserved[svc.Port] = svc.Name
	}
	getCert, ready := a.opts.GetCertificate, func() error { return nil }
	if getCert == nil {
		// The node's own certificate from the tailnet CA (agent/certs):
		// clients that trust the CA need no -k.
		getCert = a.GetCertificate
		ready = func() error { _, _, err := a.certs.CA(); return err }
	}
	a.services = services{getCert: getCert, log: a.log, list: a.opts.HTTPSServices}
	for _, svc := range a.opts.HTTPSServices {
		a.services.handlers = append(a.services.handlers, svc.NewHandler(a.WhoIs))
	}
	a.serve = serve.New(serve.Options{
		WhoIs: a.WhoIs, GetCertificate: getCert, HTTPSReady: ready, Logger: a.log, Reserved: reserved,
	}, cfg)
	return nil
}

// serveAttachLocked starts the serve listeners on the data plane that just
// came up. a.mu held, a.eng set.
func (a *Agent) serveAttachLocked() {
	// engine.listen binds kernel mode sockets to the TUN too, so only
	// connections that came through WireGuard and the filter reach them.
	a.serve.Attach(a.eng.listen, netmap.AddrsOf(a.eng.cfg.addrs))
	a.services.attach(a.eng.listen, netmap.AddrsOf(a.eng.cfg.addrs))
	a.sshAttachLocked()
}

// serveDetachLocked stops serve's listeners and the daemon's HTTPS
// services: the data plane is going down. a.mu held.
func (a *Agent) serveDetachLocked() {
	a.serve.Detach()
	a.services.detach()
	a.sshDetachLocked()
}

// ServeStatus lists what the node serves.
func (a *Agent) ServeStatus(context.Context) (*localapi.ServeStatus, error) {
	st := &localapi.ServeStatus{Entries: a.serve.Status()}
	a.mu.Lock()
	defer a.mu.Unlock()
	st.Message = a.serveNote
	if a.nm != nil {
		st.DNSName = a.nm.Self.DNSName
	}
	if a.eng == nil && len(st.Entries) > 0 && st.Message == "" {
		st.Message = "the node is not up: entries start serving when it is"
	}
	return st, nil
}

// ServeAdd serves req's port; see serve.NewEntry for what a target may be.
func (a *Agent) ServeAdd(ctx context.Context, req localapi.ServeRequest) (*localapi.ServeStatus, error) {
	proto, err := serve.ParseProto(req.Proto)
	if err != nil {
		return nil, err
	}
	e, err := serve.NewEntry(proto, req.Port, req.Target)
	if err != nil {
		return nil, err
	}
	if err := a.serve.Add(e, a.store.SaveServeConfig); err != nil {
		return nil, err
	}
	a.serveEdited()
	return a.ServeStatus(ctx)
}

// ServeRemove stops serving req's port (req.Target is ignored).
func (a *Agent) ServeRemove(ctx context.Context, req localapi.ServeRequest) (*localapi.ServeStatus, error) {
	proto, err := serve.ParseProto(req.Proto)
	if err != nil {
		return nil, err
	}
	if err := a.serve.Remove(proto, req.Port, a.store.SaveServeConfig); err != nil {
		return nil, err
	}
	a.serveEdited()
	return a.ServeStatus(ctx)
}

// ServeReset stops serving everything.
func (a *Agent) ServeReset(ctx context.Context) (*localapi.ServeStatus, error) {
	if err := a.serve.Reset(a.store.SaveServeConfig); err != nil {
		return nil, err
	}
	a.serveEdited()
	return a.ServeStatus(ctx)
}

// serveEdited drops the note about a corrupt saved configuration once a
// new one has been saved over it.
func (a *Agent) serveEdited() {
	a.mu.Lock()
	a.serveNote = ""
	a.mu.Unlock()
}
