package transit

import (
	"fmt"

	"github.com/tink-crypto/tink-go/v2/aead/aesgcm"
	"github.com/tink-crypto/tink-go/v2/aead/aesgcmsiv"
	"github.com/tink-crypto/tink-go/v2/aead/chacha20poly1305"
	"github.com/tink-crypto/tink-go/v2/aead/xchacha20poly1305"
	"github.com/tink-crypto/tink-go/v2/key"
)

// VaultType names a key's type as Vault's key read does: "aes128-gcm96",
// "aes256-gcm96" and "chacha20-poly1305" are Vault's own names for the
// same algorithms; the Cairn templates Vault lacks get names in the same
// style ("xchacha20-poly1305", "aes256-gcm-siv"); anything else is
// "unknown".
func VaultType(p key.Parameters) string {
	switch p := p.(type) {
	case *aesgcm.Parameters:
		if p.IVSizeInBytes() == 12 && p.TagSizeInBytes() == 16 {
			return fmt.Sprintf("aes%d-gcm96", 8*p.KeySizeInBytes())
		}
		return fmt.Sprintf("aes%d-gcm", 8*p.KeySizeInBytes())
	case *aesgcmsiv.Parameters:
		return fmt.Sprintf("aes%d-gcm-siv", 8*p.KeySizeInBytes())
	case *chacha20poly1305.Parameters:
		return "chacha20-poly1305"
	case *xchacha20poly1305.Parameters:
		return "xchacha20-poly1305"
	}
	return "unknown"
}
