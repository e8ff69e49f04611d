// One Azure Batch pool for fanout's tasks, sized by an autoscale formula that:
// - counts task slots, not nodes: nodes wanted = ceil(pending tasks / tasks per node),
//   where tasks per node = floor($TaskSlotsPerNode / slotsPerTask);
// - runs on spot (low-priority) nodes first and, while spot nodes are preempted,
//   backfills with up to maxDedicatedNodes dedicated nodes;
// - scales to zero once no task has been pending for idleMinutes;
// - removes nodes only when their tasks complete (taskcompletion).
// The formula language counts every task as one slot ($PendingTasks is a task
// count), so set slotsPerTask to the requiredSlots your handlers' tasks ask for.
//
// With containerRegistryServer, it is a container pool: each node gets nodeIdentityId
// (a user-assigned identity) and, when it starts, pulls containerImageNames from that
// registry as that identity (Batch's identityReference: no password anywhere), so
// container tasks start without a pull. The node image must have a Docker-compatible
// runtime. Batch then requires every task on the pool to carry containerSettings
// (the schema: "All regular tasks and job manager tasks run on this pool must
// specify the containerSettings property"), so such a pool takes container work only. Schema: Microsoft.Batch/batchAccounts/pools@2024-07-01, properties
// deploymentConfiguration.virtualMachineConfiguration.containerConfiguration
// (ContainerConfiguration: type 'DockerCompatible' | 'CriCompatible',
// containerImageNames, containerRegistries of ContainerRegistry {registryServer,
// identityReference: ComputeNodeIdentityReference {resourceId}}) and identity
// (BatchPoolIdentity: type 'UserAssigned' | 'None', userAssignedIdentities):
// https://learn.microsoft.com/azure/templates/microsoft.batch/2024-07-01/batchaccounts/pools
// https://learn.microsoft.com/azure/batch/batch-docker-container-workloads

@description('The Batch account the pool belongs to.')
param batchAccountName string

@description('Pool id: what fanout\'s [batch] pool or a message\'s pool names.')
param poolName string

@description('VM size of the nodes.')
param vmSize string

@description('Marketplace image of the nodes.')
param imageReference object

@description('Batch node agent matching the image.')
param nodeAgentSkuId string

@minValue(1)
@maxValue(256)
@description('Task slots per node: how many one-slot tasks run on a node at once.')
param taskSlotsPerNode int

@minValue(1)
@description('Slots each task requires (the requiredSlots of the handlers\' tasks).')
param slotsPerTask int = 1

@minValue(0)
@description('Upper bound on spot (low-priority) nodes.')
param maxSpotNodes int

@minValue(0)
@description('Upper bound on dedicated nodes used to replace preempted spot nodes.')
param maxDedicatedNodes int

@minValue(1)
@description('Minutes without pending tasks before the pool shrinks to zero.')
param idleMinutes int = 10

@description('Resource id of a user-assigned identity the nodes act as (to pull from containerRegistryServer); empty for none.')
param nodeIdentityId string = ''

@description('Registry the nodes pull containerImageNames from as nodeIdentityId (an ACR where that identity holds AcrPull); empty for a pool without containers.')
param containerRegistryServer string = ''

@description('Images each node pulls when it starts, as full references (<registry>/<repository>:<tag>).')
param containerImageNames array = []

var containerized = !empty(containerRegistryServer)

var containerConfiguration = {
  type: 'DockerCompatible'
  containerImageNames: containerImageNames
  containerRegistries: [
    {
      registryServer: containerRegistryServer
      identityReference: {
        resourceId: nodeIdentityId
      }
    }
  ]
}

var nodeIdentity = {
  type: 'UserAssigned'
  userAssignedIdentities: {
    '${nodeIdentityId}': {}
  }
}

var autoScaleFormula = join([
  '// fanout ${poolName}: slot-aware, spot first, preemption backfill, zero when idle.'
  '$maxSpot = ${maxSpotNodes};'
  '$maxDedicated = ${maxDedicatedNodes};'
  '$slotsPerTask = ${slotsPerTask};'
  '$tasksPerNode = max(1, floor($TaskSlotsPerNode / $slotsPerTask));'
  '$lastPending = max($PendingTasks.GetSample(1));'
  '$enoughSamples = $PendingTasks.GetSamplePercent(TimeInterval_Minute * ${idleMinutes}) >= 70;'
  '$recentPending = $enoughSamples ? max($PendingTasks.GetSample(TimeInterval_Minute * ${idleMinutes})) : $lastPending;'
  '$pending = max($lastPending, $recentPending);'
  '$wanted = ceil($pending / $tasksPerNode);'
  '$preempted = max($PreemptedNodeCount.GetSample(1));'
  '$TargetLowPriorityNodes = min($maxSpot, $wanted);'
  '$TargetDedicatedNodes = min($maxDedicated, min($wanted, $preempted + max(0, $wanted - $maxSpot)));'
  '$NodeDeallocationOption = taskcompletion;'
], '\n')

resource batchAccount 'Microsoft.Batch/batchAccounts@2024-07-01' existing = {
  name: batchAccountName
}

resource pool 'Microsoft.Batch/batchAccounts/pools@2024-07-01' = {
  parent: batchAccount
  name: poolName
  // null leaves a property out: a pool without containers has no identity.
  identity: empty(nodeIdentityId) ? null : nodeIdentity
  properties: {
    vmSize: vmSize
    deploymentConfiguration: {
      virtualMachineConfiguration: {
        imageReference: imageReference
        nodeAgentSkuId: nodeAgentSkuId
        containerConfiguration: containerized ? containerConfiguration : null
      }
    }
    taskSlotsPerNode: taskSlotsPerNode
    taskSchedulingPolicy: {
      // Fill a node before starting the next, so idle nodes empty out and go away.
      nodeFillType: 'Pack'
    }
    interNodeCommunication: 'Disabled'
    targetNodeCommunicationMode: 'Simplified'
    scaleSettings: {
      autoScale: {
        formula: autoScaleFormula
        evaluationInterval: 'PT5M'
      }
    }
  }
}

output name string = pool.name
output formula string = autoScaleFormula
output containerImageNames array = containerized ? containerImageNames : []
