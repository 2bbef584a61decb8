package sshserver

import (
	"errors"
	"fmt"
	"os/user"
	"strconv"
)

// LocalUser is a login account of this machine.
type LocalUser struct {
	Name   string
	UID    uint32
	GID    uint32
	Groups []uint32 // supplementary groups
	Home   string
	Shell  string
}

// LookupUser finds name in the machine's user database (/etc/passwd,
// /etc/group, or NSS when built with cgo).
func LookupUser(name string) (*LocalUser, error) {
	u, err := user.Lookup(name)
	if err != nil {
		if errors.As(err, new(user.UnknownUserError)) {
			return nil, fmt.Errorf("there is no local user %q on this machine", name)
		}
		return nil, fmt.Errorf("look up local user %q: %w", name, err)
	}
	uid, err1 := strconv.ParseUint(u.Uid, 10, 32)
	gid, err2 := strconv.ParseUint(u.Gid, 10, 32)
	if err1 != nil || err2 != nil {
		return nil, fmt.Errorf("local user %q has a non-numeric uid or gid", name)
	}
	lu := &LocalUser{Name: u.Username, UID: uint32(uid), GID: uint32(gid), Home: u.HomeDir, Shell: "/bin/sh"}
	gids, err := u.GroupIds()
	if err != nil {
		return nil, fmt.Errorf("groups of local user %q: %w", name, err)
	}
	for _, g := range gids {
		n, err := strconv.ParseUint(g, 10, 32)
		if err != nil {
			return nil, fmt.Errorf("local user %q has a non-numeric group %q", name, g)
		}
		lu.Groups = append(lu.Groups, uint32(n))
	}
	if sh, err := loginShell(name); err == nil && sh != "" {
		lu.Shell = sh
	}
	return lu, nil
}
