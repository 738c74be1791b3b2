package kubernetes

import (
	appsv1 "k8s.io/api/apps/v1"
	autoscalingv2 "k8s.io/api/autoscaling/v2"
	policyv1 "k8s.io/api/policy/v1"
)

type (
	appsStatefulSet = appsv1.StatefulSet
	autoscalingHPA  = autoscalingv2.HorizontalPodAutoscaler
	policyPDB       = policyv1.PodDisruptionBudget
)
