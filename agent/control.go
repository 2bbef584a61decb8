package agent

import (
	"errors"
	"fmt"

	"meshd.dev/meshd/control"
)

// defaultControlClient builds the real coordinator client.
func defaultControlClient(c ControlConfig) (ControlClient, error) {
	cl, err := control.NewClient(control.ClientOptions{URL: c.URL, MachineKey: c.MachineKey, ServerPin: c.ServerPin, Logger: c.Logger})
	if err != nil {
		return nil, fmt.Errorf("coordinator %s: %w", c.URL, err)
	}
	return cl, nil
}

// explainControlError turns a registration failure into a one-line error
// saying what to do.
func explainControlError(url string, err error) error {
	var hint string
	switch {
	case errors.Is(err, control.ErrAuthKeyUnknown):
		hint = "check the key, or create one with `meshd admin keys create`"
	case errors.Is(err, control.ErrAuthKeyExpired):
		hint = "create a new key with `meshd admin keys create`"
	case errors.Is(err, control.ErrAuthKeyUsed):
		hint = "single-use keys work once; create a new one, or use --reusable"
	case errors.Is(err, control.ErrAuthKeyRevoked):
		hint = "the key was revoked; create a new one"
	case errors.Is(err, control.ErrPinMismatch):
		hint = "the coordinator's key is not the one this auth key or state dir expects; check --coordinator (possible interception)"
	case errors.Is(err, control.ErrTagsForbidden):
		hint = "the auth key may not apply those tags; drop --advertise-tags or use a key that carries them"
	default:
		hint = "check --coordinator and that the coordinator is running and reachable"
	}
	return fmt.Errorf("register with %s: %w (%s)", url, err, hint)
}
