// fanout's Azure infrastructure, in one resource group:
//   az deployment group create -g <rg> -f deploy/bicep/main.bicep -p aksOidcIssuer=<url>
// - Service Bus namespace + queue (duplicate detection, dead-lettering on expiry),
//   and the events queue fanout's job monitor publishes completion events to (also
//   with duplicate detection), plus any reply-to queues messages may name;
// - storage account with input, output and task-log containers, and a lifecycle rule
//   deleting task logs after logRetentionDays;
// - Event Grid system topic on the storage account, BlobCreated in the input
//   container delivered to the queue (CloudEvents 1.0), as fanout's blob events;
// - Batch account with a CPU pool and a GPU pool (autoscaled, spot first, to zero);
// - with containerPools=true, an Azure Container Registry (admin user off), an
//   identity for the pools' nodes holding AcrPull on it, and two container pools
//   (cpu-containers, gpu-containers) that prefetch fanout's ffmpeg and Blender task
//   images from it (deploy/images/, docs/deploy.md);
// - a user-assigned identity for fanout with least-privilege roles, and one for
//   KEDA's queue-length reads; federated with AKS service accounts when
//   aksOidcIssuer is given.
// Outputs feed fanout's configuration: fanoutToml is a ready fanout.toml.
// Not compiled or deployed in this repository's CI (no Bicep compiler offline):
// run `az bicep build -f deploy/bicep/main.bicep` and `az deployment group what-if`.

targetScope = 'resourceGroup'

@description('Region of every resource.')
param location string = resourceGroup().location

@minLength(3)
@maxLength(11)
@description('Lower-case prefix of resource names.')
param prefix string = 'fanout'

@description('Queue fanout reads.')
param queueName string = 'fanout'

@description('Container whose new blobs become messages on the queue.')
param inputContainerName string = 'input'

@description('Container tasks write their outputs to.')
param outputContainerName string = 'output'

@description('Queue the job monitor publishes completion events (CloudEvents 1.0, fanout.job.completed) to: fanout\'s [events] queue.')
param eventsQueueName string = 'fanout-events'

@description('Extra queues on the namespace that a message may name as its reply-to ([events] allowed_reply_to); each is created like the events queue, and fanout may send to it.')
param replyToQueueNames array = []

@description('Container tasks upload stdout.txt and stderr.txt to (<job>/<task>/): fanout\'s [jobs] logs_container.')
param logsContainerName string = 'fanout-logs'

@minValue(1)
@description('Days after upload that task logs are deleted by the storage lifecycle rule. Keep it at or above jobRetention\'s days, so a job\'s logs outlive the job.')
param logRetentionDays int = 14

@description('Longest a job may run ([jobs] max_wall_clock, ISO 8601): Batch terminates it then.')
param jobMaxWallClock string = 'P1D'

@description('How long after their end fanout deletes its terminal jobs ([jobs] retention, ISO 8601).')
param jobRetention string = 'P7D'

@description('VM size of the CPU pool.')
param cpuVmSize string = 'Standard_D4as_v5'

@description('Task slots per CPU node (one per vCPU of cpuVmSize).')
param cpuTaskSlotsPerNode int = 4

@description('Upper bound on spot nodes in the CPU pool.')
param cpuMaxSpotNodes int = 20

@description('Upper bound on dedicated nodes backfilling preempted CPU spot nodes.')
param cpuMaxDedicatedNodes int = 2

@description('VM size of the GPU pool.')
param gpuVmSize string = 'Standard_NC4as_T4_v3'

@description('Task slots per GPU node (one per GPU of gpuVmSize).')
param gpuTaskSlotsPerNode int = 1

@description('Upper bound on spot nodes in the GPU pool.')
param gpuMaxSpotNodes int = 4

@description('Upper bound on dedicated nodes backfilling preempted GPU spot nodes.')
param gpuMaxDedicatedNodes int = 1

@description('Also deploy a container registry, an identity for the nodes that pulls from it (AcrPull), and the container pools cpu-containers and gpu-containers, which prefetch the task images fanout/ffmpeg and fanout/blender (deploy/images/). Off: only the cpu and gpu pools, as before.')
param containerPools bool = false

@allowed([
  'Basic'
  'Standard'
  'Premium'
])
@description('SKU of the container registry (with containerPools).')
param registrySku string = 'Basic'

@description('Tag of the task images the container pools prefetch: <registry>/fanout/ffmpeg:<tag> and <registry>/fanout/blender:<tag>. Push them before tasks run (docs/deploy.md).')
param taskImageTag string = '0.1.0'

@description('Marketplace image of the container pools\' nodes: one with a Docker-compatible runtime (and NVIDIA drivers and container toolkit, for the GPU pool). `az batch pool supported-images list` marks such images DockerCompatible.')
param containerPoolImageReference object = {
  publisher: 'microsoft-dsvm'
  offer: 'ubuntu-hpc'
  sku: '2404'
  version: 'latest'
}

@description('Batch node agent matching containerPoolImageReference.')
param containerPoolNodeAgentSkuId string = 'batch.node.ubuntu 24.04'

@description('OIDC issuer URL of the AKS cluster (az aks show --query oidcIssuerProfile.issuerUrl); empty for no federation (VM only).')
param aksOidcIssuer string = ''

@description('Kubernetes namespace and service account fanout runs as.')
param fanoutNamespace string = 'fanout'
param fanoutServiceAccount string = 'fanout'

@description('Kubernetes namespace and service account of the KEDA operator.')
param kedaNamespace string = 'keda'
param kedaServiceAccount string = 'keda-operator'

@description('Let fanout read the queue\'s message counts (fanout_queue_messages). Service Bus serves them only to the Manage right, which the only built-in role with it (Data Owner) grants on the queue alone here.')
param workerReadsQueueDepth bool = true

var suffix = uniqueString(resourceGroup().id, prefix)
var serviceBusName = 'sb-${prefix}-${suffix}'
var storageName = take('st${prefix}${suffix}', 24)
var batchName = take('ba${prefix}${suffix}', 24)
// Registry names are 5-50 letters and digits; the login server is <name> plus the
// cloud's suffix (.azurecr.io in Azure's public cloud), in lower case.
var registryName = take('acr${prefix}${suffix}', 50)
var registryServer = toLower('${registryName}${environment().suffixes.acrLoginServer}')
// The task images the container pools prefetch (built from deploy/images/).
var ffmpegImage = '${registryServer}/fanout/ffmpeg:${taskImageTag}'
var blenderImage = '${registryServer}/fanout/blender:${taskImageTag}'
var cpuContainerImages = [
  ffmpegImage
  blenderImage
]
var gpuContainerImages = [
  blenderImage
]

// Built-in role definitions (the ids are the same in every tenant).
var roles = {
  serviceBusDataReceiver: '4f6d3b9b-027b-4f4c-9142-0e5a2a2247e0'
  serviceBusDataSender: '69a216fc-b8fb-44d8-bc22-1f3c2cd27a39'
  serviceBusDataOwner: '090c5cfd-751d-490a-894a-3ce6f1109419'
  storageBlobDataContributor: 'ba92f5b4-2d11-453d-a403-e96b0029c9fe'
  storageBlobDelegator: 'db58b8e5-c6ad-4a2a-8342-4190687cbf4a'
  batchDataContributor: '6aaa78f1-f7de-44ca-8722-c64a23943cae'
  // AcrPull: pull images from a container registry (read only; no push, no delete).
  // https://learn.microsoft.com/azure/role-based-access-control/built-in-roles/containers#acrpull
  acrPull: '7f951dda-4ed3-4680-a7ca-43fe172d538d'
}

// ---------------------------------------------------------------- identities

resource workerIdentity 'Microsoft.ManagedIdentity/userAssignedIdentities@2023-01-31' = {
  name: 'id-${prefix}-worker'
  location: location
}

resource scalerIdentity 'Microsoft.ManagedIdentity/userAssignedIdentities@2023-01-31' = {
  name: 'id-${prefix}-scaler'
  location: location
}

// The container pools' nodes act as this identity to pull task images, and as
// nothing else: it holds AcrPull on the registry and no other role.
resource poolIdentity 'Microsoft.ManagedIdentity/userAssignedIdentities@2023-01-31' = if (containerPools) {
  name: 'id-${prefix}-pool'
  location: location
}

resource workerFederation 'Microsoft.ManagedIdentity/userAssignedIdentities/federatedIdentityCredentials@2023-01-31' = if (!empty(aksOidcIssuer)) {
  parent: workerIdentity
  name: 'aks-${fanoutNamespace}-${fanoutServiceAccount}'
  properties: {
    issuer: aksOidcIssuer
    subject: 'system:serviceaccount:${fanoutNamespace}:${fanoutServiceAccount}'
    audiences: [
      'api://AzureADTokenExchange'
    ]
  }
}

resource scalerFederation 'Microsoft.ManagedIdentity/userAssignedIdentities/federatedIdentityCredentials@2023-01-31' = if (!empty(aksOidcIssuer)) {
  parent: scalerIdentity
  name: 'aks-${kedaNamespace}-${kedaServiceAccount}'
  properties: {
    issuer: aksOidcIssuer
    subject: 'system:serviceaccount:${kedaNamespace}:${kedaServiceAccount}'
    audiences: [
      'api://AzureADTokenExchange'
    ]
  }
}

// ---------------------------------------------------------------- Service Bus

resource serviceBus 'Microsoft.ServiceBus/namespaces@2021-11-01' = {
  name: serviceBusName
  location: location
  sku: {
    // Duplicate detection needs Standard or Premium.
    name: 'Standard'
    tier: 'Standard'
  }
  properties: {
    disableLocalAuth: true
    minimumTlsVersion: '1.2'
  }
}

resource queue 'Microsoft.ServiceBus/namespaces/queues@2021-11-01' = {
  parent: serviceBus
  name: queueName
  properties: {
    // fanout renews locks while it submits; one minute bounds a crashed worker's hold.
    lockDuration: 'PT1M'
    maxDeliveryCount: 10
    requiresDuplicateDetection: true
    duplicateDetectionHistoryTimeWindow: 'PT1H'
    deadLetteringOnMessageExpiration: true
    defaultMessageTimeToLive: 'P7D'
    requiresSession: false
    enableBatchedOperations: true
    maxSizeInMegabytes: 1024
  }
}

// The events queue (and reply-to queues). Event ids are deterministic (derived from
// the job id) and are the message ids: when two replicas' monitors, or one retrying
// after a crash between publish and marking the job reported, send the same event,
// duplicate detection drops the repeat. Repeats come within a poll or two, so one
// hour is ample. Consumers of the events have two weeks to read them; expired ones
// are dead-lettered, not lost silently.
var eventQueueProperties = {
  lockDuration: 'PT1M'
  maxDeliveryCount: 10
  requiresDuplicateDetection: true
  duplicateDetectionHistoryTimeWindow: 'PT1H'
  deadLetteringOnMessageExpiration: true
  defaultMessageTimeToLive: 'P14D'
  requiresSession: false
  enableBatchedOperations: true
  maxSizeInMegabytes: 1024
}

resource eventsQueue 'Microsoft.ServiceBus/namespaces/queues@2021-11-01' = {
  parent: serviceBus
  name: eventsQueueName
  properties: eventQueueProperties
}

resource replyQueues 'Microsoft.ServiceBus/namespaces/queues@2021-11-01' = [for replyTo in replyToQueueNames: {
  parent: serviceBus
  name: replyTo
  properties: eventQueueProperties
}]

// ---------------------------------------------------------------- storage

resource storage 'Microsoft.Storage/storageAccounts@2023-05-01' = {
  name: storageName
  location: location
  kind: 'StorageV2'
  sku: {
    name: 'Standard_LRS'
  }
  properties: {
    accessTier: 'Hot'
    // Entra ID only: fanout hands tasks user delegation SAS, which needs no key.
    allowSharedKeyAccess: false
    allowBlobPublicAccess: false
    minimumTlsVersion: 'TLS1_2'
    supportsHttpsTrafficOnly: true
  }
}

resource blobService 'Microsoft.Storage/storageAccounts/blobServices@2023-05-01' = {
  parent: storage
  name: 'default'
}

resource inputContainer 'Microsoft.Storage/storageAccounts/blobServices/containers@2023-05-01' = {
  parent: blobService
  name: inputContainerName
  properties: {
    publicAccess: 'None'
  }
}

resource outputContainer 'Microsoft.Storage/storageAccounts/blobServices/containers@2023-05-01' = {
  parent: blobService
  name: outputContainerName
  properties: {
    publicAccess: 'None'
  }
}

// Tasks upload their stdout.txt and stderr.txt here through a write SAS fanout signs
// (user delegation, scoped to the job's prefix); the monitor range-reads the tail of
// stderr.txt for the completion event with the worker identity's blob role.
resource logsContainer 'Microsoft.Storage/storageAccounts/blobServices/containers@2023-05-01' = {
  parent: blobService
  name: logsContainerName
  properties: {
    publicAccess: 'None'
  }
}

// Task logs are for diagnosis, not an archive: delete them logRetentionDays after
// upload. Lifecycle rules run about once a day, so a blob may outlive this by a day.
resource logsLifecycle 'Microsoft.Storage/storageAccounts/managementPolicies@2023-05-01' = {
  parent: storage
  name: 'default'
  properties: {
    policy: {
      rules: [
        {
          name: 'delete-task-logs'
          enabled: true
          type: 'Lifecycle'
          definition: {
            filters: {
              blobTypes: [
                'blockBlob'
                'appendBlob'
              ]
              // A prefix match starts with the container name.
              prefixMatch: [
                '${logsContainerName}/'
              ]
            }
            actions: {
              baseBlob: {
                delete: {
                  daysAfterModificationGreaterThan: logRetentionDays
                }
              }
            }
          }
        }
      ]
    }
  }
}

// ---------------------------------------------------------------- Event Grid

resource blobEvents 'Microsoft.EventGrid/systemTopics@2022-06-15' = {
  name: 'evgt-${prefix}-${suffix}'
  location: location
  identity: {
    type: 'SystemAssigned'
  }
  properties: {
    source: storage.id
    topicType: 'Microsoft.Storage.StorageAccounts'
  }
}

// The system topic sends to the queue with its own identity (local auth is off).
resource eventGridSendsToQueue 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(queue.id, blobEvents.id, roles.serviceBusDataSender)
  scope: queue
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.serviceBusDataSender)
    principalId: blobEvents.identity.principalId
    principalType: 'ServicePrincipal'
  }
}

resource blobCreatedToQueue 'Microsoft.EventGrid/systemTopics/eventSubscriptions@2022-06-15' = {
  parent: blobEvents
  name: 'blob-created-to-${queueName}'
  dependsOn: [
    eventGridSendsToQueue
    inputContainer
  ]
  properties: {
    eventDeliverySchema: 'CloudEventSchemaV1_0'
    deliveryWithResourceIdentity: {
      identity: {
        type: 'SystemAssigned'
      }
      destination: {
        endpointType: 'ServiceBusQueue'
        properties: {
          resourceId: queue.id
        }
      }
    }
    filter: {
      includedEventTypes: [
        'Microsoft.Storage.BlobCreated'
      ]
      // Only blobs in the input container: outputs written by tasks must not loop.
      subjectBeginsWith: '/blobServices/default/containers/${inputContainerName}/blobs/'
      // A finished upload, not each flush of a Data Lake append.
      advancedFilters: [
        {
          operatorType: 'StringIn'
          key: 'data.api'
          values: [
            'PutBlob'
            'PutBlockList'
            'CopyBlob'
            'FlushWithClose'
          ]
        }
      ]
    }
    retryPolicy: {
      maxDeliveryAttempts: 30
      eventTimeToLiveInMinutes: 1440
    }
  }
}

// ---------------------------------------------------------------- Batch

resource batch 'Microsoft.Batch/batchAccounts@2024-07-01' = {
  name: batchName
  location: location
  properties: {
    poolAllocationMode: 'BatchService'
    publicNetworkAccess: 'Enabled'
    // Entra ID for fanout; task tokens for tasks that call back into Batch.
    allowedAuthenticationModes: [
      'AAD'
      'TaskAuthenticationToken'
    ]
  }
}

// ---------------------------------------------------------------- container registry
// Microsoft.ContainerRegistry/registries@2023-07-01 (RegistryProperties: adminUserEnabled,
// publicNetworkAccess, loginServer read-only; Sku.name Basic | Standard | Premium):
// https://learn.microsoft.com/azure/templates/microsoft.containerregistry/2023-07-01/registries
// No admin user and no passwords: operators push with their Entra ID (az acr login /
// az acr build, which needs AcrPush or Contributor), nodes pull as poolIdentity.
// Public network access stays on: Batch nodes without a virtual network reach the
// registry over its public endpoint, authenticated (Basic and Standard have no
// private endpoints).

resource registry 'Microsoft.ContainerRegistry/registries@2023-07-01' = if (containerPools) {
  name: registryName
  location: location
  sku: {
    name: registrySku
  }
  properties: {
    adminUserEnabled: false
    publicNetworkAccess: 'Enabled'
  }
}

resource poolPullsImages 'Microsoft.Authorization/roleAssignments@2022-04-01' = if (containerPools) {
  name: guid(registry.id, poolIdentity.id, roles.acrPull)
  scope: registry
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.acrPull)
    principalId: poolIdentity.properties.principalId
    principalType: 'ServicePrincipal'
  }
}

// ---------------------------------------------------------------- Batch pools

module cpuPool 'modules/batch-pool.bicep' = {
  name: 'pool-cpu'
  params: {
    batchAccountName: batch.name
    poolName: 'cpu'
    vmSize: cpuVmSize
    imageReference: {
      publisher: 'canonical'
      offer: '0001-com-ubuntu-server-jammy'
      sku: '22_04-lts'
      version: 'latest'
    }
    nodeAgentSkuId: 'batch.node.ubuntu 22.04'
    taskSlotsPerNode: cpuTaskSlotsPerNode
    maxSpotNodes: cpuMaxSpotNodes
    maxDedicatedNodes: cpuMaxDedicatedNodes
  }
}

module gpuPool 'modules/batch-pool.bicep' = {
  name: 'pool-gpu'
  params: {
    batchAccountName: batch.name
    poolName: 'gpu'
    vmSize: gpuVmSize
    // Ubuntu HPC image: NVIDIA drivers and CUDA preinstalled.
    imageReference: {
      publisher: 'microsoft-dsvm'
      offer: 'ubuntu-hpc'
      sku: '2204'
      version: 'latest'
    }
    nodeAgentSkuId: 'batch.node.ubuntu 22.04'
    taskSlotsPerNode: gpuTaskSlotsPerNode
    maxSpotNodes: gpuMaxSpotNodes
    maxDedicatedNodes: gpuMaxDedicatedNodes
  }
}

// Container pools: the same formula and sizes as cpu and gpu, on an image with a
// Docker-compatible runtime. Each node starts by pulling its images from the registry
// as poolIdentity (Batch's identityReference), so tasks start without a pull. They
// wait for the AcrPull grant; nodes start only when tasks are pending (the formula
// scales from zero), so the images can be pushed after the deployment.
module cpuContainerPool 'modules/batch-pool.bicep' = if (containerPools) {
  name: 'pool-cpu-containers'
  dependsOn: [
    poolPullsImages
  ]
  params: {
    batchAccountName: batch.name
    poolName: 'cpu-containers'
    vmSize: cpuVmSize
    imageReference: containerPoolImageReference
    nodeAgentSkuId: containerPoolNodeAgentSkuId
    taskSlotsPerNode: cpuTaskSlotsPerNode
    maxSpotNodes: cpuMaxSpotNodes
    maxDedicatedNodes: cpuMaxDedicatedNodes
    nodeIdentityId: poolIdentity.id
    containerRegistryServer: registryServer
    containerImageNames: cpuContainerImages
  }
}

// Blender on GPU nodes: Batch gives container tasks the node's GPUs itself.
module gpuContainerPool 'modules/batch-pool.bicep' = if (containerPools) {
  name: 'pool-gpu-containers'
  dependsOn: [
    poolPullsImages
  ]
  params: {
    batchAccountName: batch.name
    poolName: 'gpu-containers'
    vmSize: gpuVmSize
    imageReference: containerPoolImageReference
    nodeAgentSkuId: containerPoolNodeAgentSkuId
    taskSlotsPerNode: gpuTaskSlotsPerNode
    maxSpotNodes: gpuMaxSpotNodes
    maxDedicatedNodes: gpuMaxDedicatedNodes
    nodeIdentityId: poolIdentity.id
    containerRegistryServer: registryServer
    containerImageNames: gpuContainerImages
  }
}

// ---------------------------------------------------------------- role assignments
// fanout's identity: receive and send on the queue only; send on the events queue
// (and the reply-to queues), and receive on the events queue only so that `fanout
// events` can peek it (Service Bus serves peeks to the Listen right, which only
// the Receiver role carries; fanout never consumes an event); read/write blobs and
// sign user delegation SAS on the storage account; manage jobs and tasks on the
// Batch account. KEDA's identity: the Manage right on the queue only, for its length.

resource workerReceives 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(queue.id, workerIdentity.id, roles.serviceBusDataReceiver)
  scope: queue
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.serviceBusDataReceiver)
    principalId: workerIdentity.properties.principalId
    principalType: 'ServicePrincipal'
  }
}

resource workerSends 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(queue.id, workerIdentity.id, roles.serviceBusDataSender)
  scope: queue
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.serviceBusDataSender)
    principalId: workerIdentity.properties.principalId
    principalType: 'ServicePrincipal'
  }
}

resource workerSendsEvents 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(eventsQueue.id, workerIdentity.id, roles.serviceBusDataSender)
  scope: eventsQueue
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.serviceBusDataSender)
    principalId: workerIdentity.properties.principalId
    principalType: 'ServicePrincipal'
  }
}

resource workerPeeksEvents 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(eventsQueue.id, workerIdentity.id, roles.serviceBusDataReceiver)
  scope: eventsQueue
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.serviceBusDataReceiver)
    principalId: workerIdentity.properties.principalId
    principalType: 'ServicePrincipal'
  }
}

resource workerSendsReplies 'Microsoft.Authorization/roleAssignments@2022-04-01' = [for i in range(0, length(replyToQueueNames)): {
  name: guid(replyQueues[i].id, workerIdentity.id, roles.serviceBusDataSender)
  scope: replyQueues[i]
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.serviceBusDataSender)
    principalId: workerIdentity.properties.principalId
    principalType: 'ServicePrincipal'
  }
}]

resource workerReadsQueue 'Microsoft.Authorization/roleAssignments@2022-04-01' = if (workerReadsQueueDepth) {
  name: guid(queue.id, workerIdentity.id, roles.serviceBusDataOwner)
  scope: queue
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.serviceBusDataOwner)
    principalId: workerIdentity.properties.principalId
    principalType: 'ServicePrincipal'
  }
}

resource workerBlobData 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(storage.id, workerIdentity.id, roles.storageBlobDataContributor)
  scope: storage
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.storageBlobDataContributor)
    principalId: workerIdentity.properties.principalId
    principalType: 'ServicePrincipal'
  }
}

resource workerBlobDelegator 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(storage.id, workerIdentity.id, roles.storageBlobDelegator)
  scope: storage
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.storageBlobDelegator)
    principalId: workerIdentity.properties.principalId
    principalType: 'ServicePrincipal'
  }
}

resource workerBatch 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(batch.id, workerIdentity.id, roles.batchDataContributor)
  scope: batch
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.batchDataContributor)
    principalId: workerIdentity.properties.principalId
    principalType: 'ServicePrincipal'
  }
}

resource scalerReadsQueue 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(queue.id, scalerIdentity.id, roles.serviceBusDataOwner)
  scope: queue
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.serviceBusDataOwner)
    principalId: scalerIdentity.properties.principalId
    principalType: 'ServicePrincipal'
  }
}

// ---------------------------------------------------------------- outputs

var serviceBusFqdn = '${serviceBus.name}.servicebus.windows.net'
var batchAccountUrl = 'https://${batch.properties.accountEndpoint}'
var blobAccountUrl = storage.properties.primaryEndpoints.blob
// A JSON array of strings is a TOML array too.
var allowedReplyTo = string(replyToQueueNames)

output serviceBusNamespaceName string = serviceBus.name
output serviceBusFqdn string = serviceBusFqdn
output queueName string = queue.name
output batchAccountUrl string = batchAccountUrl
output batchAccountName string = batch.name
output cpuPoolName string = cpuPool.outputs.name
output gpuPoolName string = gpuPool.outputs.name
output blobAccountUrl string = blobAccountUrl
output storageAccountName string = storage.name
output inputContainerName string = inputContainer.name
output outputContainerName string = outputContainer.name
output eventsQueueName string = eventsQueue.name
output replyToQueueNames array = replyToQueueNames
output logsContainerName string = logsContainer.name
output workerClientId string = workerIdentity.properties.clientId
output workerIdentityId string = workerIdentity.id
output scalerClientId string = scalerIdentity.properties.clientId
output containerPools bool = containerPools
output registryName string = containerPools ? registry.name : ''
@description('The registry\'s login server: where to push the task images (docs/deploy.md).')
output registryLoginServer string = containerPools ? registry.properties.loginServer : ''
output poolIdentityId string = containerPools ? poolIdentity.id : ''
output cpuContainerPoolName string = containerPools ? cpuContainerPool.outputs.name : ''
output gpuContainerPoolName string = containerPools ? gpuContainerPool.outputs.name : ''
output ffmpegImage string = containerPools ? ffmpegImage : ''
output blenderImage string = containerPools ? blenderImage : ''

@description('fanout.toml for these resources (Entra ID throughout: no secrets).')
output fanoutToml string = join([
  '[servicebus]'
  'namespace = "${serviceBusFqdn}"'
  'queue = "${queue.name}"'
  ''
  '[batch]'
  'account_url = "${batchAccountUrl}"'
  'pool = "${cpuPool.outputs.name}"'
  ''
  '[blob]'
  'account_url = "${blobAccountUrl}"'
  ''
  '[events]'
  'queue = "${eventsQueue.name}"'
  'allowed_reply_to = ${allowedReplyTo}'
  ''
  '[jobs]'
  'logs_container = "${logsContainer.name}"'
  'max_wall_clock = "${jobMaxWallClock}"'
  'retention = "${jobRetention}"'
  ''
], '\n')

@description('With containerPools: fanout.toml lines to append to fanoutToml, naming the registry, the pool identity and the task images (docs/deploy.md).')
output containerToml string = !containerPools ? '' : join([
  '[registries.acr]'
  'server = "${registryServer}"'
  'identity = "${poolIdentity.id}"'
  ''
  '[handlers.transcode]'
  'container_image = "${ffmpegImage}"'
  'container_registry = "acr"'
  'container_working_directory = "taskWorkingDirectory"'
  ''
  '[handlers.render.profiles.blender]'
  'command = "blender -b {scene} -o {output_pattern} -F PNG -s {start} -e {end} -j {step} -a"'
  'container_image = "${blenderImage}"'
  'container_registry = "acr"'
  'container_working_directory = "taskWorkingDirectory"'
  ''
], '\n')
