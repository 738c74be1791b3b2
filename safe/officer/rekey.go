package officer

import (
	"context"
	"crypto/subtle"
	"errors"
	"fmt"
	"time"

	"google.golang.org/protobuf/proto"

	"github.com/cairnkms/cairn/internal/hpkeseal"
	"github.com/cairnkms/cairn/internal/secret"
	cryptov1 "github.com/cairnkms/cairn/proto/cairn/crypto/v1"
	distributorv1 "github.com/cairnkms/cairn/proto/cairn/distributor/v1"
	safev1 "github.com/cairnkms/cairn/proto/cairn/safe/v1"
	"github.com/cairnkms/cairn/safe"
)

// Rekey is a rekey ceremony this process opened on a distributor: it holds
// one ephemeral HPKE key per new safe, which the distributor seals the new
// shares to. The private keys never leave this process; Close wipes them.
type Rekey struct {
	// CeremonyID is the distributor's ceremony: officers release their
	// current shares into it (Release), as in an unseal ceremony.
	CeremonyID string
	threshold  int
	safes      []safe.Safe
	officers   []string
	recipients []*hpkeseal.Recipient
}

// OpenRekey opens a rekey ceremony: the root key, rebuilt by the
// distributor from K current shares, is to be split threshold-of-len(safes)
// into the new safes (officers optionally names one SPIFFE ID per safe).
func OpenRekey(ctx context.Context, client distributorv1.DistributorClient, threshold int, safes []safe.Safe, officers []string, ttl time.Duration) (*Rekey, error) {
	if len(officers) != 0 && len(officers) != len(safes) {
		return nil, fmt.Errorf("officer: %d officers for %d new safes; name one per safe or none", len(officers), len(safes))
	}
	r := &Rekey{threshold: threshold, safes: safes, officers: officers}
	plan := &distributorv1.RekeyPlan{Threshold: uint32(threshold)}
	for i, s := range safes {
		rc, err := hpkeseal.NewRecipient()
		if err != nil {
			r.Close()
			return nil, err
		}
		r.recipients = append(r.recipients, rc)
		slot := &distributorv1.RekeySlot{SafeLabel: s.Label(), SafeKind: s.Kind(), Recipient: rc.PublicKey()}
		if len(officers) > 0 {
			slot.Officer = officers[i]
		}
		plan.Slots = append(plan.Slots, slot)
	}
	c, err := client.OpenCeremony(ctx, &distributorv1.OpenCeremonyRequest{Kind: distributorv1.CeremonyKind_CEREMONY_KIND_REKEY,
		TtlSeconds: uint32(ttl / time.Second), Rekey: plan})
	if err != nil {
		r.Close()
		return nil, fmt.Errorf("officer: opening a rekey ceremony: %w", err)
	}
	r.CeremonyID = c.GetId()
	return r, nil
}

// Close wipes the ephemeral keys.
func (r *Rekey) Close() {
	for _, rc := range r.recipients {
		rc.Close()
	}
	r.recipients = nil
}

// Finish collects a succeeded rekey ceremony's result: it checks the new
// manifest against prev and the plan, opens every new share, checks them
// (commitments, and that groups of K reproduce the KCV), seals share i into
// new safe i and reads each back. It returns the new manifest, to be written
// and installed on every distributor (InstallManifest) before the old shares
// are destroyed. On error it destroys any new share it sealed.
func (r *Rekey) Finish(ctx context.Context, client distributorv1.DistributorClient, prev *safev1.GenesisManifest) (_ *safev1.GenesisManifest, err error) {
	c, err := client.GetCeremony(ctx, &distributorv1.GetCeremonyRequest{CeremonyId: r.CeremonyID})
	if err != nil {
		return nil, fmt.Errorf("officer: ceremony %s: %w", r.CeremonyID, err)
	}
	if c.GetKind() != distributorv1.CeremonyKind_CEREMONY_KIND_REKEY || c.GetState() != distributorv1.CeremonyState_CEREMONY_STATE_SUCCEEDED {
		return nil, fmt.Errorf("officer: ceremony %s is a %s ceremony %s (%s), not a succeeded rekey", r.CeremonyID, c.GetKind(), c.GetState(), c.GetDetail())
	}
	m, err := safe.ParseManifest(c.GetRekeyedManifest())
	if err != nil {
		return nil, fmt.Errorf("officer: the rekeyed manifest: %w", err)
	}
	if err := r.checkManifest(prev, m); err != nil {
		return nil, err
	}
	if len(c.GetRekeyedShares()) != len(r.safes) {
		return nil, fmt.Errorf("officer: ceremony %s returned %d new shares for %d safes", r.CeremonyID, len(c.GetRekeyedShares()), len(r.safes))
	}
	shares := make([]secret.Bytes, len(r.safes))
	defer func() {
		for _, s := range shares {
			s.Wipe()
		}
	}()
	for i, sealed := range c.GetRekeyedShares() {
		if shares[i], err = r.open(m, uint32(i+1), sealed); err != nil {
			return nil, err
		}
	}
	if err := safe.VerifyShares(m, shares); err != nil {
		return nil, fmt.Errorf("officer: the new shares: %w", err)
	}
	var sealed []int
	defer func() {
		if err == nil {
			return
		}
		cleanup := context.WithoutCancel(ctx)
		for _, i := range sealed {
			ref := safe.ShareRef{GenesisID: m.GetGenesisId(), Epoch: m.GetEpoch(), Index: uint32(i + 1)}
			if derr := r.safes[i].Destroy(cleanup, ref); derr != nil {
				err = errors.Join(err, fmt.Errorf("officer: rolling back new share %d in %s: %w", i+1, r.safes[i].Label(), derr))
			}
		}
	}()
	for i, s := range r.safes {
		ref := safe.ShareRef{GenesisID: m.GetGenesisId(), Epoch: m.GetEpoch(), Index: uint32(i + 1)}
		if err := s.Seal(ctx, ref, shares[i]); err != nil {
			return nil, fmt.Errorf("officer: sealing new share %d into %s: %w", ref.Index, s.Label(), err)
		}
		sealed = append(sealed, i)
		back, err := s.Unseal(ctx, ref)
		if err != nil {
			return nil, fmt.Errorf("officer: reading back new share %d from %s: %w", ref.Index, s.Label(), err)
		}
		same := subtle.ConstantTimeCompare(back.Data(), shares[i].Data()) == 1
		back.Wipe()
		if !same {
			return nil, fmt.Errorf("officer: new share %d read back from %s differs from what was sealed", ref.Index, s.Label())
		}
	}
	return m, nil
}

// checkManifest checks that m is prev's successor as planned.
func (r *Rekey) checkManifest(prev, m *safev1.GenesisManifest) error {
	if err := safe.CheckSuccessor(prev, m); err != nil {
		return fmt.Errorf("officer: the rekeyed manifest: %w", err)
	}
	if int(m.GetThreshold()) != r.threshold || len(m.GetSlots()) != len(r.safes) {
		return fmt.Errorf("officer: the rekeyed manifest is %d-of-%d, the plan %d-of-%d", m.GetThreshold(), len(m.GetSlots()), r.threshold, len(r.safes))
	}
	for i, s := range r.safes {
		sl := safe.Slot(m, uint32(i+1))
		want := ""
		if len(r.officers) > 0 {
			want = r.officers[i]
		}
		if sl.GetSafeLabel() != s.Label() || sl.GetSafeKind() != s.Kind() || sl.GetOfficer() != want {
			return fmt.Errorf("officer: the rekeyed manifest's share %d is for %s (%s, officer %q), the plan's for %s (%s, officer %q)",
				i+1, sl.GetSafeLabel(), sl.GetSafeKind(), sl.GetOfficer(), s.Label(), s.Kind(), want)
		}
	}
	return nil
}

// open opens new share index.
func (r *Rekey) open(m *safev1.GenesisManifest, index uint32, sealed *cryptov1.HpkeSealed) (secret.Bytes, error) {
	info, err := safe.RekeyShareInfo(r.CeremonyID, m.GetGenesisId(), m.GetEpoch(), index)
	if err != nil {
		return secret.Bytes{}, err
	}
	plain, err := r.recipients[index-1].Open(sealed, info)
	if err != nil {
		return secret.Bytes{}, fmt.Errorf("officer: new share %d does not open with its safe's key: %w", index, err)
	}
	defer plain.Wipe()
	raw := plain.Data()
	defer clear(raw)
	var rel safev1.ReleasedShare
	if err := proto.Unmarshal(raw, &rel); err != nil {
		return secret.Bytes{}, fmt.Errorf("officer: new share %d is unreadable", index)
	}
	share := secret.New(rel.GetShare())
	clear(rel.Share)
	if rel.GetGenesisId() != m.GetGenesisId() || rel.GetEpoch() != m.GetEpoch() || rel.GetIndex() != index {
		share.Wipe()
		return secret.Bytes{}, fmt.Errorf("officer: new share %d names %s/%d/%d", index, rel.GetGenesisId(), rel.GetEpoch(), rel.GetIndex())
	}
	return share, nil
}

// InstallManifest pins the rekeyed manifest m on a distributor and checks,
// with GetStatus, that the distributor now pins exactly m.
func InstallManifest(ctx context.Context, client distributorv1.DistributorClient, m *safev1.GenesisManifest) (changed bool, err error) {
	b, err := proto.MarshalOptions{Deterministic: true}.Marshal(m)
	if err != nil {
		return false, err
	}
	resp, err := client.InstallManifest(ctx, &distributorv1.InstallManifestRequest{Manifest: b})
	if err != nil {
		return false, fmt.Errorf("officer: installing the manifest: %w", err)
	}
	if err := CheckPinned(ctx, client, m); err != nil {
		return false, err
	}
	return resp.GetChanged(), nil
}

// CheckPinned reports an error unless the distributor pins exactly m.
func CheckPinned(ctx context.Context, client distributorv1.DistributorClient, m *safev1.GenesisManifest) error {
	h, err := safe.ManifestHash(m)
	if err != nil {
		return err
	}
	st, err := client.GetStatus(ctx, &distributorv1.GetStatusRequest{})
	if err != nil {
		return fmt.Errorf("officer: checking the pinned manifest: %w", err)
	}
	if st.GetGenesisId() != m.GetGenesisId() || st.GetEpoch() != m.GetEpoch() || subtle.ConstantTimeCompare(st.GetManifestSha256(), h) != 1 {
		return fmt.Errorf("officer: the distributor pins genesis %s epoch %d (sha256 %x), not genesis %s epoch %d (sha256 %x)",
			st.GetGenesisId(), st.GetEpoch(), st.GetManifestSha256(), m.GetGenesisId(), m.GetEpoch(), h)
	}
	return nil
}
