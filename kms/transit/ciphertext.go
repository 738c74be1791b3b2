package transit

import (
	"encoding/base64"
	"errors"
	"fmt"
	"strconv"
	"strings"

	"github.com/cairnkms/cairn/kms/keystore"
)

// ciphertextPrefix starts every Vault-form ciphertext.
const ciphertextPrefix = "vault:v"

// ErrCiphertext is wrapped by every error of ParseCiphertext and
// FormatCiphertext.
var ErrCiphertext = errors.New("transit: invalid ciphertext")

// FormatCiphertext returns the Vault form of a Cairn ciphertext (as the gRPC
// API returns it): "vault:v<N>:" and the standard base64 of ct, where N is
// the key ID of ct's Tink prefix. It fails if ct has no Tink prefix.
func FormatCiphertext(ct []byte) (string, error) {
	id, ok := keystore.KeyIDOf(ct)
	if !ok {
		return "", fmt.Errorf("%w: no Tink key ID prefix", ErrCiphertext)
	}
	b := make([]byte, 0, len(ciphertextPrefix)+11+base64.StdEncoding.EncodedLen(len(ct)))
	b = append(b, ciphertextPrefix...)
	b = strconv.AppendUint(b, uint64(id), 10)
	b = append(b, ':')
	b = base64.StdEncoding.AppendEncode(b, ct)
	return string(b), nil
}

// ParseCiphertext returns the Cairn ciphertext of a Vault-form one
// ("vault:v<N>:<base64>") and its version N, which must be the key ID of
// the ciphertext's Tink prefix. N is decimal without sign or leading zeros;
// the base64 is standard, padded, with zero trailing bits. The errors say
// what is wrong with the form only: whether the ciphertext decrypts is the
// KMS's business.
func ParseCiphertext(s string) ([]byte, uint32, error) {
	rest, ok := strings.CutPrefix(s, ciphertextPrefix)
	if !ok {
		return nil, 0, fmt.Errorf("%w: want the form vault:v<version>:<base64>", ErrCiphertext)
	}
	num, enc, ok := strings.Cut(rest, ":")
	if !ok {
		return nil, 0, fmt.Errorf("%w: want the form vault:v<version>:<base64>", ErrCiphertext)
	}
	version, err := parseVersion(num)
	if err != nil {
		return nil, 0, err
	}
	ct, err := base64.StdEncoding.Strict().DecodeString(enc)
	if err != nil || len(ct) == 0 || strings.ContainsAny(enc, "\r\n") {
		return nil, 0, fmt.Errorf("%w: the part after vault:v%d: is not standard base64", ErrCiphertext, version)
	}
	id, ok := keystore.KeyIDOf(ct)
	if !ok {
		return nil, 0, fmt.Errorf("%w: no Tink key ID prefix", ErrCiphertext)
	}
	if id != version {
		return nil, 0, fmt.Errorf("%w: version v%d is not the ciphertext's key version %d", ErrCiphertext, version, id)
	}
	return ct, version, nil
}

// parseVersion parses the N of "vault:v<N>:": a uint32 in canonical
// decimal.
func parseVersion(s string) (uint32, error) {
	if s == "" || len(s) > 10 || (len(s) > 1 && s[0] == '0') || strings.ContainsFunc(s, func(r rune) bool { return r < '0' || r > '9' }) {
		return 0, fmt.Errorf("%w: the version after vault:v is not a decimal key version", ErrCiphertext)
	}
	n, err := strconv.ParseUint(s, 10, 32)
	if err != nil {
		return 0, fmt.Errorf("%w: version %s is out of range (key versions are 32-bit)", ErrCiphertext, s)
	}
	return uint32(n), nil
}
