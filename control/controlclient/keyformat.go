package controlclient

import (
	"errors"
	"strings"
)

// Auth key and admin token formats. Both carry the coordinator fingerprint,
// as kubeadm and k3s join tokens carry the CA hash, so that holding the
// string is enough to verify the coordinator.
const (
	AuthKeyPrefix    = "mskey"
	AdminTokenPrefix = "msadm"
	KeyIDLen         = 12 // hex characters
	FingerprintLen   = 64 // hex SHA-256
	secretLen        = 32 // base32 characters
)

// AuthKey is an auth key split into its parts.
type AuthKey struct {
	ID, Secret, Fingerprint string
}

// ParseAuthKey splits "mskey-<id>-<secret>-<fingerprint>".
func ParseAuthKey(s string) (AuthKey, error) {
	parts := strings.Split(strings.TrimSpace(s), "-")
	if len(parts) != 4 || parts[0] != AuthKeyPrefix {
		return AuthKey{}, errors.New("auth key is malformed: want mskey-ID-SECRET-FINGERPRINT as printed by `meshd admin keys create`")
	}
	k := AuthKey{ID: parts[1], Secret: parts[2], Fingerprint: parts[3]}
	if len(k.ID) != KeyIDLen || !IsHex(k.ID) || len(k.Fingerprint) != FingerprintLen || !IsHex(k.Fingerprint) || len(k.Secret) != secretLen {
		return AuthKey{}, errors.New("auth key is malformed: an id, secret or fingerprint part has the wrong length; copy the whole key")
	}
	return k, nil
}

func (k AuthKey) String() string {
	return AuthKeyPrefix + "-" + k.ID + "-" + k.Secret + "-" + k.Fingerprint
}

// AuthKeyFingerprint returns the coordinator fingerprint an auth key
// carries, for callers that want to pin before registering.
func AuthKeyFingerprint(key string) (string, error) {
	k, err := ParseAuthKey(key)
	if err != nil {
		return "", err
	}
	return k.Fingerprint, nil
}

// AdminTokenFingerprint returns the coordinator fingerprint carried by an
// admin token ("msadm-<secret>-<fingerprint>").
func AdminTokenFingerprint(token string) (string, error) {
	parts := strings.Split(strings.TrimSpace(token), "-")
	if len(parts) != 3 || parts[0] != AdminTokenPrefix || len(parts[2]) != FingerprintLen || !IsHex(parts[2]) {
		return "", errors.New("admin token is malformed: want msadm-SECRET-FINGERPRINT, the content of the coordinator's admin.token")
	}
	return parts[2], nil
}

// IsHex reports whether s is lowercase hexadecimal.
func IsHex(s string) bool {
	for _, c := range s {
		if !(c >= '0' && c <= '9' || c >= 'a' && c <= 'f') {
			return false
		}
	}
	return true
}
