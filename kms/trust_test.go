package kms_test

import (
	"crypto/ed25519"
	"strings"
	"testing"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/cairnkms/cairn/internal/audit"
	"github.com/cairnkms/cairn/internal/bundle"
	"github.com/cairnkms/cairn/internal/identity"
	"github.com/cairnkms/cairn/kms"
	"github.com/cairnkms/cairn/kms/kmstest"
	kmsv1 "github.com/cairnkms/cairn/proto/cairn/kms/v1"
)

// TestSetTrust: the pinned signing keys and the admin allowlist are
// replaced while serving, together: a bundle signed by the new key applies
// and one by the old key no longer does; the new admin may call KMSAdmin
// and the old one no longer may. The change is audited with the new key
// IDs; an invalid trust changes nothing.
func TestSetTrust(t *testing.T) {
	e := newEnv(t)
	s := e.start(kms1ID, "")
	e.apply(s, e.bundle(e.ks))
	const newAdminID = "spiffe://cairn.test/regionctl/global/ops-2"
	td := e.pki.Source(kms1ID).TrustDomain()
	newAdmins, err := identity.ParseAllowlist(td, "regionctl/global/ops-2")
	if err != nil {
		t.Fatal(err)
	}
	next := kmstest.NewSigner(t)
	oldSigner := e.signer

	for _, bad := range []kms.Trust{
		{Admins: newAdmins},
		{SigningKeys: []ed25519.PublicKey{next.Public[:5]}, Admins: newAdmins},
		{SigningKeys: []ed25519.PublicKey{next.Public}},
	} {
		if err := s.SetTrust(bad); err == nil {
			t.Errorf("SetTrust(%d keys, admins %v) = nil, want an error", len(bad.SigningKeys), bad.AdminPatterns())
		}
	}
	if got := s.CurrentTrust(); !got.Equal(kms.Trust{SigningKeys: []ed25519.PublicKey{oldSigner.Public}, Admins: mustAllowlist(t, td, "regionctl/*/*")}) {
		t.Fatalf("CurrentTrust after refused changes = %v %v, want the original", got.KeyIDs(), got.AdminPatterns())
	}

	if err := s.SetTrust(kms.Trust{SigningKeys: []ed25519.PublicKey{next.Public}, Admins: newAdmins}); err != nil {
		t.Fatalf("SetTrust(new key, new admins) = %v", err)
	}
	// The old admin is denied, the new one allowed.
	if _, err := s.admin.GetStatus(ctx(t), &kmsv1.GetStatusRequest{}); status.Code(err) != codes.PermissionDenied {
		t.Errorf("GetStatus as the old admin after SetTrust = %v, want PermissionDenied", err)
	}
	admin2 := kmsv1.NewKMSAdminClient(e.conn(newAdminID, s.addr))
	// Signed by the old key: refused; by the new key: applied.
	e.signer = oldSigner
	if _, err := admin2.ApplyBundle(ctx(t), &kmsv1.ApplyBundleRequest{Bundle: e.bundle(e.ks)}); status.Code(err) != codes.InvalidArgument || !strings.Contains(err.Error(), "signature") {
		t.Errorf("ApplyBundle(signed by the unpinned old key) = %v, want InvalidArgument about the signature", err)
	}
	e.signer = next
	if _, err := admin2.ApplyBundle(ctx(t), &kmsv1.ApplyBundleRequest{Bundle: e.bundle(e.ks)}); err != nil {
		t.Errorf("ApplyBundle(signed by the new key, as the new admin) = %v", err)
	}

	recs, err := audit.ReadFile(s.auditPath)
	if err != nil {
		t.Fatal(err)
	}
	found := false
	for _, r := range recs {
		if r.Operation == "kms/SetTrust" {
			found = true
			if !strings.Contains(r.Reason, "now "+bundle.KeyID(next.Public)) || !strings.Contains(r.Reason, "were "+bundle.KeyID(oldSigner.Public)) ||
				!strings.Contains(r.Reason, "regionctl/global/ops-2") {
				t.Errorf("SetTrust audit reason = %q, want the new and old key IDs and the new admins", r.Reason)
			}
		}
	}
	if !found {
		t.Errorf("no kms/SetTrust audit record among %d", len(recs))
	}
}

func mustAllowlist(t *testing.T, td spiffeid.TrustDomain, patterns ...string) identity.Allowlist {
	t.Helper()
	a, err := identity.ParseAllowlist(td, patterns...)
	if err != nil {
		t.Fatal(err)
	}
	return a
}
