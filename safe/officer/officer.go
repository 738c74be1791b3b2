// Package officer is what a security officer's `safe` tool does against a
// distributor: release a share into an unseal ceremony, provision a new RMK
// at genesis, and run a restore drill. The share or key leaves the safe only
// inside an HPKE envelope sealed to the ceremony's ephemeral key.
package officer

import (
	"context"
	"errors"
	"fmt"
	"strconv"

	"google.golang.org/protobuf/proto"

	"github.com/cairnkms/cairn/internal/hpkeseal"
	"github.com/cairnkms/cairn/internal/secret"
	distributorv1 "github.com/cairnkms/cairn/proto/cairn/distributor/v1"
	safev1 "github.com/cairnkms/cairn/proto/cairn/safe/v1"
	"github.com/cairnkms/cairn/safe"
)

// HPKE info labels; they must match the distributor's (distributor.proto).
const (
	infoShare     = "cairn/distributor/v1/share"
	infoProvision = "cairn/distributor/v1/provision"
)

// Release unseals this safe's share of the ceremony's genesis and submits it,
// HPKE-sealed to the ceremony key. It checks the share against the manifest
// before sending, so a safe with a bad share is named here, not at the
// distributor. It returns the ceremony's state after the submission.
func Release(ctx context.Context, client distributorv1.DistributorClient, ceremonyID string, m *safev1.GenesisManifest, s safe.Safe) (*distributorv1.Ceremony, error) {
	c, err := client.GetCeremony(ctx, &distributorv1.GetCeremonyRequest{CeremonyId: ceremonyID})
	if err != nil {
		return nil, fmt.Errorf("officer: ceremony %s: %w", ceremonyID, err)
	}
	if c.GetState() != distributorv1.CeremonyState_CEREMONY_STATE_OPEN {
		return nil, fmt.Errorf("officer: ceremony %s is %s (%s)", ceremonyID, c.GetState(), c.GetDetail())
	}
	if c.GetGenesisId() != m.GetGenesisId() {
		return nil, fmt.Errorf("officer: ceremony %s is for genesis %s, this manifest is %s", ceremonyID, c.GetGenesisId(), m.GetGenesisId())
	}
	index, err := safe.SlotOf(m, s)
	if err != nil {
		return nil, err
	}
	ref := safe.ShareRef{GenesisID: m.GetGenesisId(), Epoch: m.GetEpoch(), Index: index}
	share, err := s.Unseal(ctx, ref)
	if err != nil {
		return nil, fmt.Errorf("officer: unsealing share %s from %s: %w", ref, s.Label(), err)
	}
	defer share.Wipe()
	cb, err := safe.NewCombiner(m)
	if err != nil {
		return nil, err
	}
	if err := cb.Check(index, share); err != nil {
		return nil, fmt.Errorf("officer: share in %s: %w", s.Label(), err)
	}
	raw := share.Data()
	rel := &safev1.ReleasedShare{GenesisId: ref.GenesisID, Epoch: ref.Epoch, Index: ref.Index, Share: raw}
	plain, err := proto.Marshal(rel)
	clear(raw)
	if err != nil {
		return nil, err
	}
	defer clear(plain)
	info, err := hpkeseal.Info(infoShare, ceremonyID, m.GetGenesisId(), strconv.FormatUint(uint64(index), 10))
	if err != nil {
		return nil, err
	}
	sealed, err := hpkeseal.Seal(c.GetCeremonyKey(), info, plain)
	if err != nil {
		return nil, fmt.Errorf("officer: sealing the share to the ceremony key: %w", err)
	}
	resp, err := client.SubmitShare(ctx, &distributorv1.SubmitShareRequest{CeremonyId: ceremonyID, ShareIndex: index, SealedShare: sealed})
	if err != nil {
		return nil, fmt.Errorf("officer: submitting share %d: %w", index, err)
	}
	return resp.GetCeremony(), nil
}

// Provision hands a freshly made RMK to a distributor in a provisioning
// ceremony. The distributor accepts it only if it matches m's KCV, and then
// pins m.
func Provision(ctx context.Context, client distributorv1.DistributorClient, m *safev1.GenesisManifest, rmk secret.Bytes) error {
	if !safe.CheckKCV(rmk, m) {
		return errors.New("officer: the key to provision does not match the manifest's KCV")
	}
	mb, err := proto.Marshal(m)
	if err != nil {
		return err
	}
	c, err := client.OpenCeremony(ctx, &distributorv1.OpenCeremonyRequest{Kind: distributorv1.CeremonyKind_CEREMONY_KIND_PROVISION, Manifest: mb, TtlSeconds: 300})
	if err != nil {
		return fmt.Errorf("officer: opening a provisioning ceremony: %w", err)
	}
	info, err := hpkeseal.Info(infoProvision, c.GetId(), m.GetGenesisId())
	if err != nil {
		return err
	}
	raw := rmk.Data()
	sealed, err := hpkeseal.Seal(c.GetCeremonyKey(), info, raw)
	clear(raw)
	if err != nil {
		return err
	}
	resp, err := client.ProvisionRootKey(ctx, &distributorv1.ProvisionRootKeyRequest{CeremonyId: c.GetId(), SealedRootKey: sealed})
	if err != nil {
		return fmt.Errorf("officer: provisioning: %w", err)
	}
	if resp.GetCeremony().GetState() != distributorv1.CeremonyState_CEREMONY_STATE_SUCCEEDED {
		return fmt.Errorf("officer: provisioning ceremony ended %s: %s", resp.GetCeremony().GetState(), resp.GetCeremony().GetDetail())
	}
	return nil
}
