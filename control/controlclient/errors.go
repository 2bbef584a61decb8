package controlclient

import (
	"errors"
	"net/http"
)

// Errors the agent and the CLI tell apart with errors.Is. The server sends
// a stable code in the JSON error body and the client maps it back to the
// sentinel, so these work across the wire.
var (
	ErrPinMismatch    = errors.New("coordinator key does not match the pinned fingerprint")
	ErrAuthKeyExpired = errors.New("auth key expired")
	ErrAuthKeyRevoked = errors.New("auth key revoked")
	ErrAuthKeyUsed    = errors.New("auth key already used")
	ErrAuthKeyUnknown = errors.New("auth key unknown")
	ErrNodeExpired    = errors.New("node key expired")
	ErrNotRegistered  = errors.New("machine not registered")
	ErrNotAuthorized  = errors.New("node waiting for approval")
	ErrTagsForbidden  = errors.New("tags not permitted")
	ErrUnauthorized   = errors.New("admin token missing or wrong")
	ErrBadRequest     = errors.New("bad request")
	ErrNotFound       = errors.New("not found")
	ErrTooOld         = errors.New("client protocol version too old")
	// ErrPolicyInvalid is a policy that fails to parse, to validate or its
	// own tests; the previous policy stays in force.
	ErrPolicyInvalid = errors.New("policy rejected")
	// ErrKeyInUse is a node key or disco key that another node already
	// holds: no two nodes share one.
	ErrKeyInUse = errors.New("key held by another node")
	// ErrKeyProof is a registration or node key change without a valid
	// proof that the node holds the new key's private half.
	ErrKeyProof = errors.New("node key proof missing or invalid")
	// ErrRateLimited is a request refused because its sender made too
	// many of its kind recently (certificate requests); retry later.
	ErrRateLimited = errors.New("too many requests")
)

// errorCodes is the wire form of each sentinel. Codes never change meaning.
var errorCodes = []struct {
	err    error
	code   string
	status int
}{
	{ErrAuthKeyExpired, "auth_key_expired", http.StatusUnauthorized},
	{ErrAuthKeyRevoked, "auth_key_revoked", http.StatusUnauthorized},
	{ErrAuthKeyUsed, "auth_key_used", http.StatusUnauthorized},
	{ErrAuthKeyUnknown, "auth_key_unknown", http.StatusUnauthorized},
	{ErrNodeExpired, "node_expired", http.StatusUnauthorized},
	{ErrNotRegistered, "not_registered", http.StatusNotFound},
	{ErrNotAuthorized, "not_authorized", http.StatusForbidden},
	{ErrTagsForbidden, "tags_forbidden", http.StatusForbidden},
	{ErrUnauthorized, "unauthorized", http.StatusUnauthorized},
	{ErrNotFound, "not_found", http.StatusNotFound},
	{ErrTooOld, "too_old", http.StatusBadRequest},
	{ErrPolicyInvalid, "policy_invalid", http.StatusUnprocessableEntity},
	{ErrKeyInUse, "key_in_use", http.StatusConflict},
	{ErrKeyProof, "node_key_proof", http.StatusForbidden},
	{ErrRateLimited, "rate_limited", http.StatusTooManyRequests},
	{ErrBadRequest, "bad_request", http.StatusBadRequest},
}

// Code returns the wire code and HTTP status for err.
func Code(err error) (string, int) {
	for _, c := range errorCodes {
		if errors.Is(err, c.err) {
			return c.code, c.status
		}
	}
	return "internal", http.StatusInternalServerError
}

// ErrorBody is the JSON body of every error response.
type ErrorBody struct {
	Error string `json:"error"`
	Code  string `json:"code"`
}

// APIError is an error response from the coordinator. It unwraps to the
// sentinel named by its code, if any.
type APIError struct {
	Status  int
	Code    string
	Message string
}

func (e *APIError) Error() string { return e.Message }

// Unwrap returns the sentinel for e.Code.
func (e *APIError) Unwrap() error {
	for _, c := range errorCodes {
		if c.code == e.Code {
			return c.err
		}
	}
	return nil
}
