package serve

import (
	"encoding/json"
	"mime"
	"net/http"
	"strconv"
	"strings"

	"meshd.dev/meshd/agent/whois"
)

// The identity headers an HTTP or HTTPS entry sets on each proxied request,
// from whois of the caller's tailnet address. The Tailscale-* ones carry
// the same values under the names `tailscale serve` uses, so applications
// written for it work unchanged.
const (
	// HeaderUserLogin is the caller's owner's login (alice@example.com).
	// Absent for tagged callers: a tagged node acts for no user.
	HeaderUserLogin = "Meshd-User-Login"
	// HeaderUserName is the owner's display name. meshd stores none, so it
	// is the login's local part (alice), or the login if it has no "@".
	HeaderUserName = "Meshd-User-Name"
	// HeaderNodeName is the caller's MagicDNS name without the trailing
	// dot (laptop.tailnet.internal), or its hostname when the map carries
	// no DNS name.
	HeaderNodeName = "Meshd-Node-Name"
	// HeaderNodeID is the caller's node id, in decimal.
	HeaderNodeID = "Meshd-Node-ID"
	// HeaderNodeTags are the caller's tags, comma-separated; absent for
	// untagged callers.
	HeaderNodeTags = "Meshd-Node-Tags"
	// HeaderAppCapabilities is the JSON object of the app capabilities the
	// policy's grants give the caller on this node ({} when none), keyed
	// by capability name, values as the policy wrote them.
	HeaderAppCapabilities = "Meshd-App-Capabilities"

	HeaderTailscaleUserLogin   = "Tailscale-User-Login"
	HeaderTailscaleUserName    = "Tailscale-User-Name"
	HeaderTailscaleHeadersInfo = "Tailscale-Headers-Info"
)

// tailscaleHeadersInfo is the value Tailscale itself sends: the meaning of
// the Tailscale-* headers is the same here.
const tailscaleHeadersInfo = "https://tailscale.com/s/serve-headers"

// identityPrefixes are the header name prefixes (lowercase, "_" read as
// "-") that only serve may set: every incoming header starting with one is
// removed before the identity headers are added. Tailscale-* as a whole,
// not just the names set here, because applications written for tailscale
// serve trust any of its headers (Tailscale-User-Profile-Pic,
// Tailscale-App-Capabilities, Tailscale-Funnel-Request).
var identityPrefixes = []string{"meshd-", "tailscale-"}

// isIdentityHeader reports whether a request header named name is one a
// caller must not send. The comparison ignores case and treats "_" as "-",
// because CGI, WSGI, PHP and many proxies fold both into one variable
// (HTTP_MESHD_USER_LOGIN), so Meshd_User_Login would reach such a backend
// as the real header.
func isIdentityHeader(name string) bool {
	for _, p := range identityPrefixes {
		if len(name) < len(p) {
			continue
		}
		match := true
		for i := range len(p) {
			c := name[i]
			if c == '_' {
				c = '-'
			}
			if 'A' <= c && c <= 'Z' {
				c += 'a' - 'A'
			}
			if c != p[i] {
				match = false
				break
			}
		}
		if match {
			return true
		}
	}
	return false
}

// stripIdentity removes from h every header a caller could use to pose as
// someone: all values of every name isIdentityHeader matches, in any case
// or spelling that reached the map.
func stripIdentity(h http.Header) {
	for name := range h {
		if isIdentityHeader(name) {
			delete(h, name)
		}
	}
}

// setIdentity adds who's identity headers to h, which stripIdentity has
// cleaned.
func setIdentity(h http.Header, who *whois.Response) {
	h.Set(HeaderNodeName, headerValue(who.Node.Name()))
	h.Set(HeaderNodeID, strconv.FormatInt(int64(who.Node.ID), 10))
	if len(who.Node.Tags) > 0 {
		h.Set(HeaderNodeTags, headerValue(strings.Join(who.Node.Tags, ",")))
	}
	caps := []byte("{}")
	if len(who.Capabilities) > 0 {
		// Map keys come out sorted; RawMessage values are compacted and
		// checked, and JSON escapes control characters, so the value is
		// one valid header line.
		if b, err := json.Marshal(who.Capabilities); err == nil {
			caps = b
		}
	}
	h.Set(HeaderAppCapabilities, string(caps))
	h.Set(HeaderTailscaleHeadersInfo, tailscaleHeadersInfo)
	if who.User == "" {
		return
	}
	login, display := headerValue(who.User), headerValue(displayName(who.User))
	h.Set(HeaderUserLogin, login)
	h.Set(HeaderUserName, display)
	h.Set(HeaderTailscaleUserLogin, login)
	h.Set(HeaderTailscaleUserName, display)
}

// displayName is what serve offers as a user's name: the login's local
// part, since the coordinator stores no display names.
func displayName(login string) string {
	if i := strings.LastIndexByte(login, '@'); i > 0 {
		return login[:i]
	}
	return login
}

// headerValue returns s unchanged when it is printable ASCII, and
// otherwise RFC 2047 Q-encoded (=?utf-8?q?...?=), as Tailscale does for
// names: a raw non-ASCII value is read differently by different backends,
// and a control character would make the request invalid.
func headerValue(s string) string {
	for i := range len(s) {
		if s[i] < 0x20 || s[i] > 0x7e {
			return mime.QEncoding.Encode("utf-8", s)
		}
	}
	return s
}
