package transit_test

import (
	"os/exec"
	"strings"
	"testing"
)

// vaultClients are the Vault client libraries the end-to-end tests drive
// the transit API with. They are test-only: the KMS serves Vault's API, it
// never links a Vault client.
var vaultClients = []string{
	"github.com/hashicorp/vault/api",
	"github.com/tink-crypto/tink-go-hcvault/v2/integration/hcvault",
}

func goListDeps(t *testing.T, args ...string) map[string]bool {
	t.Helper()
	out, err := exec.Command("go", append([]string{"list", "-deps"}, args...)...).Output()
	if err != nil {
		t.Fatalf("go list -deps %v: %v", args, err)
	}
	set := map[string]bool{}
	for _, p := range strings.Fields(string(out)) {
		set[p] = true
	}
	return set
}

// TestKMSLinksNoVaultClient: cmd/kms does not link the Vault clients; the
// end-to-end tests do, which shows the check can see them.
func TestKMSLinksNoVaultClient(t *testing.T) {
	kms := goListDeps(t, "github.com/cairnkms/cairn/cmd/kms")
	tests := goListDeps(t, "-test", "github.com/cairnkms/cairn/tests")
	for _, p := range vaultClients {
		if kms[p] {
			t.Errorf("go list -deps ./cmd/kms has %s; the Vault clients are for tests only", p)
		}
		if !tests[p] {
			t.Errorf("go list -deps -test ./tests has no %s; the check above cannot see what it looks for", p)
		}
	}
}
